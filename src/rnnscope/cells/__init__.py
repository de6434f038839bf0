"""Step equations and exact one-step Jacobians, one file per cell kind.

Every cell module (lstm, gru, rnn) has the same one-step vector-Jacobian product contract, so
that the adjoint sweeps (span_sweep, lag_sweep) take a cell module from `CELLS` instead of
branching on the kind:

    w = vjp_weights(p)                                 detached weights, once per layer
    s = vjp_saved(...)                                 what a step's VJP reads; any leading dims
    (d_prev_state, d_in) = step_vjp(w, s_n, d_state)   one step back

d_state and d_prev_state are tuples, the state in the cell's order ((h,) or (h, c)), each
(…, H_k) with any leading dimensions (stacked rows R·B, or per-sample rows (B, N) with
`fold=True`); d_in (…, G·H) is the cotangent of the step's input projection
gx_n = W_ih x_n + b_ih, so dx_n = d_in W_ih.
"""

from . import gru, lstm, rnn
from .layer_trace import LayerTrace

CELLS = {"lstm": lstm, "gru": gru, "rnn": rnn}  # kind -> cell module

__all__ = ["CELLS", "LayerTrace", "gru", "lstm", "rnn"]
