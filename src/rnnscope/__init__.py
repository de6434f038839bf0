"""rnnscope: measure, explain and monitor gradient flow through time in PyTorch RNNs."""

from .replay import Trace, replay

__all__ = ["Trace", "replay"]
__version__ = "0.1.0"
