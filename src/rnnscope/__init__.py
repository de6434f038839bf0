"""rnnscope: measure, explain and monitor gradient flow through time in PyTorch RNNs.

Public surface only: re-exports and __all__. Heavy optional dependencies (matplotlib,
tensorboard, lightning) are imported only where used.
"""

__version__ = "0.1.0"

from . import experiments, tasks
from .gates import chrono_init, gate_stats, init_forget_bias
from .lag import lag_profile
from .jacobians import cell_jacobians, lyapunov_spectrum, state_gradients, step_jacobians
from .monitor import AlertPolicy, GradientMonitor
from .profile import compare, gradient_profile
from .replay import Trace, replay
from .results import (CellJacobians, Comparison, DecayTable, GateLayerStats, GateStats,
                      GradientProfile, JacobianNorms, LagProfile, LyapunovSpectrum,
                      StateGradientLayer, StateGradients, StepJacobians, effective_memory)
from .theory import decay_table, memory_time
from .modern import LRU, RGLRU, SLSTM, MinGRU, MinLSTM, SelectiveSSM, linear_scan
from .modern.analyses import DecayCellJacobians
from .modern.decay_trace import DecayTrace
from .modern.sensitivity import (CurseOfMemory, ParameterSensitivity, curse_of_memory,
                                 linear_recurrence_sensitivity, parameter_sensitivity)

__all__ = [
    # measurements
    "replay", "gradient_profile", "lag_profile", "compare", "effective_memory",
    "state_gradients", "cell_jacobians", "step_jacobians", "lyapunov_spectrum", "gate_stats",
    # initialisations and closed forms
    "init_forget_bias", "chrono_init", "decay_table", "memory_time",
    # training-time monitoring, tasks and experiments
    "GradientMonitor", "AlertPolicy", "tasks", "experiments",
    # result objects
    "Trace", "GradientProfile", "LagProfile", "Comparison", "StateGradients",
    "StateGradientLayer",
    "CellJacobians", "StepJacobians", "GateStats", "GateLayerStats", "DecayTable",
    "LyapunovSpectrum", "JacobianNorms",
    # modern recurrences (issue 13): cells, their scan, parameter sensitivity
    "MinGRU", "MinLSTM", "LRU", "RGLRU", "SelectiveSSM", "SLSTM", "linear_scan",
    "parameter_sensitivity", "linear_recurrence_sensitivity", "ParameterSensitivity",
    "curse_of_memory", "CurseOfMemory", "DecayCellJacobians", "DecayTrace",
]
