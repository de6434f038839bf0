"""Step equations and exact one-step Jacobians, one file per cell kind."""

from . import gru, lstm, rnn
from .layer_trace import LayerTrace

__all__ = ["LayerTrace", "gru", "lstm", "rnn"]
