"""Step equations and exact one-step Jacobians, one file per cell kind.

Every cell module (lstm, gru, rnn) has the same one-step vector-Jacobian product contract, so
that the adjoint sweeps (span_sweep, lag_sweep) take a cell module from `CELLS` instead of
branching on the kind:

    w = vjp_weights(p)                                 detached weights, once per layer
    s = vjp_saved_from_trace(p, lt)                    what each step's VJP reads, (B, T, …),
    s = vjp_saved_from_states(p, x, h_prev, h, c0)     or (T, B, …) from time-major sequences
    (d_prev_state, d_in) = step_vjp(w, s_n, d_state)   one step back

d_state and d_prev_state are tuples, the state in the cell's order ((h,) or (h, c)), each
(…, H_k) with any leading dimensions (stacked rows R·B, or per-sample rows (B, N) with
`fold=True`); d_in (…, G·H) is the cotangent of the step's input projection
gx_n = W_ih x_n + b_ih, so dx_n = d_in W_ih. Options every step_vjp takes: fold=True (rows per
sample, (B, N, ·): fold the gate coefficients into one matrix per sample, as span_sweep does),
into= (add (∂/∂h_{n−1} | ∂/∂x_n) into the caller's buffer with one GEMM, as lag_sweep does;
needs vjp_weights(p, inputs=True)), dc_total= (LSTM: the total ∂/∂c_n, the cell-state span
Jacobian's row). The replay's own backward (lstm._LSTMCellState) is not this contract: it also
takes cotangents of the exposed gates, which an adjoint sweep never has.
"""

from . import gru, lstm, rnn
from .layer_trace import LayerTrace

CELLS = {"lstm": lstm, "gru": gru, "rnn": rnn}  # kind -> cell module

__all__ = ["CELLS", "LayerTrace", "gru", "lstm", "rnn"]
