"""rnnscope: measure, explain and monitor gradient flow through time in PyTorch RNNs.

Public surface only; the implementation lives in private-by-convention modules.
"""

from .gates import chrono_init, gate_stats, init_forget_bias
from .profile import compare, gradient_profile
from .replay import Trace, replay
from .results import (Comparison, DecayTable, GateLayerStats, GateStats, GradientProfile,
                      effective_memory)
from .theory import decay_table, memory_time

__all__ = [
    "Comparison", "DecayTable", "GateLayerStats", "GateStats", "GradientProfile", "Trace",
    "chrono_init", "compare", "decay_table", "effective_memory", "gate_stats",
    "gradient_profile", "init_forget_bias", "memory_time", "replay",
]
__version__ = "0.1.0"
