"""rnnscope: measure, explain and monitor gradient flow through time in PyTorch RNNs.

Public surface only; the implementation lives in private-by-convention modules.
"""

from .jacobians import cell_jacobians, lyapunov_spectrum, state_gradients, step_jacobians
from .gates import chrono_init, gate_stats, init_forget_bias
from .monitor import AlertPolicy, GradientMonitor
from .profile import compare, gradient_profile
from .replay import Trace, replay
from .results import (CellJacobians, Comparison, DecayTable, GateLayerStats, GateStats,
                      GradientProfile, StateGradientLayer, StateGradients, StepJacobians,
                      effective_memory)
from .theory import decay_table, memory_time

__all__ = [
    "CellJacobians", "StateGradientLayer", "StateGradients", "StepJacobians",
    "cell_jacobians", "lyapunov_spectrum", "state_gradients", "step_jacobians",
    "AlertPolicy", "GradientMonitor",
    "Comparison", "DecayTable", "GateLayerStats", "GateStats", "GradientProfile", "Trace",
    "chrono_init", "compare", "decay_table", "effective_memory", "gate_stats",
    "gradient_profile", "init_forget_bias", "memory_time", "replay",
]
__version__ = "0.1.0"
