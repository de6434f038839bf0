"""sLSTM, the scalar-memory LSTM of xLSTM (Beck et al. 2024), with exponential gating, the
normaliser n_t and the stabiliser m_t. One head (dense recurrent matrix R).

Pre-activations, gate order (z, i, f, o):  g̃_t = W_g x_t + R_g h_{t−1} + b_g    (B, H) each

    z_t = tanh(z̃_t)                    cell input
    log i_t = ĩ_t                       exponential input gate
    log f_t = f̃_t   (forget_gate="exp")   or   log σ(f̃_t)   (forget_gate="sigmoid", default)
    o_t = σ(õ_t)
    m_t = max(log f_t + m_{t−1}, log i_t)             stabiliser
    i'_t = exp(log i_t − m_t),  f'_t = exp(log f_t + m_{t−1} − m_t)
    c_t = f'_t ⊙ c_{t−1} + i'_t ⊙ z_t                 cell state  (stabilised: true c times e^{−m_t})
    n_t = f'_t ⊙ n_{t−1} + i'_t                       normaliser  (likewise)
    h_t = o_t ⊙ c_t / n_t                             (the stabiliser cancels here)

State (h, c, n, m), each (B, H); hx / h_n are a tuple of four (1, B, H) tensors in that order
(zeros if hx is None, as in the xLSTM code). Output = h (B, T, H).

Not linear in the state (R h_{t−1} feeds every gate): forward is a sequential loop, and
`step_jacobians` returns the FULL closed-form ∂s_t/∂s_{t−1} (B, T, 4H, 4H) with s = (h, c, n, m)
flattened in that order. Its highway — the direct diagonal on c and n — is f'_t (`highway`);
the per-step forget gate f_t itself is `decay` (f_t = exp(log f_t), like LSTM's f).

With s = 1[log f_t + m_{t−1} ≥ log i_t] (the branch the max takes), ℓ' = d log f/d f̃
(1 for "exp", 1 − σ(f̃) for "sigmoid") and R_g the (H, H) blocks of R:

    ∂m_t/∂m_{t−1} = diag(s),        ∂m_t/∂h_{t−1} = diag(s ℓ') R_f + diag(1 − s) R_i
    ∂f'/∂m_{t−1} = f'(1 − s),       ∂f'/∂h_{t−1} = diag(f')(diag(ℓ') R_f − ∂m_t/∂h_{t−1})
    ∂i'/∂m_{t−1} = −i' s,           ∂i'/∂h_{t−1} = diag(i')(R_i − ∂m_t/∂h_{t−1})
    ∂c_t/∂c_{t−1} = diag(f'),       ∂c_t/∂(h, m) = c_{t−1} ∂f' + z ∂i' + i' (1 − z²) R_z [h only]
    ∂n_t/∂n_{t−1} = diag(f'),       ∂n_t/∂(h, m) = n_{t−1} ∂f' + ∂i'
    ∂h_t/∂X = diag(o/n) ∂c_t/∂X − diag(o c/n²) ∂n_t/∂X + diag(c/n) o(1 − o) R_o [X = h only]

At a tie of the max the derivative does not exist; the formula takes the forget branch (s = 1),
while autograd's torch.maximum splits the gradient in half.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import ModernRecurrence

FORGET_GATES = ("sigmoid", "exp")


class SLSTM(ModernRecurrence):
    """xLSTM's sLSTM layer (one head). State (h, c, n, m), each (B, H); output h.

    Args:
        input_size: I.
        hidden_size: H.
        batch_first: x is (B, T, I) if True (default), else (T, B, I).
        forget_gate: "sigmoid" (default; log f = log σ(f̃)) or "exp" (log f = f̃).

    Example:
        >>> m = SLSTM(3, 5); y, (h, c, n, mm) = m(torch.randn(2, 7, 3))
        >>> assert y.shape == (2, 7, 5) and h.shape == c.shape == (1, 2, 5)
    """

    linear_in_state = False
    parameter_groups = {"recurrence": ("R", "W_f", "b_f"), "input": ("W_zio", "b_zio")}

    def __init__(self, input_size: int, hidden_size: int, *, batch_first: bool = True,
                 forget_gate: str = "sigmoid", device=None, dtype=None):
        super().__init__(input_size, hidden_size, batch_first=batch_first)
        if forget_gate not in FORGET_GATES:
            raise ValueError(f"forget_gate must be one of {FORGET_GATES}; got {forget_gate!r}")
        self.forget_gate = forget_gate
        kw = {"device": device, "dtype": dtype}
        H, I = self.hidden_size, self.input_size
        bound = 1 / math.sqrt(H)
        # Input weights split by role (z, i, o vs f) so that parameter groups can name them.
        self.W_zio = nn.Parameter(torch.empty(3 * H, I, **kw).uniform_(-bound, bound))
        self.b_zio = nn.Parameter(torch.empty(3 * H, **kw).uniform_(-bound, bound))
        self.W_f = nn.Parameter(torch.empty(H, I, **kw).uniform_(-bound, bound))
        self.b_f = nn.Parameter(torch.empty(H, **kw).uniform_(-bound, bound))
        self.R = nn.Parameter(torch.empty(4 * H, H, **kw).uniform_(-bound, bound))  # z, i, f, o

    # --- equations ------------------------------------------------------------------------
    def _input_part(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b for all gates, (..., 4H) in order z, i, f, o."""
        zio = F.linear(x, self.W_zio, self.b_zio)
        f = F.linear(x, self.W_f, self.b_f)
        H = self.hidden_size
        return torch.cat([zio[..., :2 * H], f, zio[..., 2 * H:]], dim=-1)

    def _log_f(self, f_pre: torch.Tensor) -> torch.Tensor:
        return f_pre if self.forget_gate == "exp" else F.logsigmoid(f_pre)

    def _cell(self, wx_t: torch.Tensor, state: tuple) -> tuple:
        h, c, n, m = state
        z_pre, i_pre, f_pre, o_pre = (wx_t + h @ self.R.t()).chunk(4, dim=-1)
        log_f = self._log_f(f_pre)
        m_new = torch.maximum(log_f + m, i_pre)
        i_s = torch.exp(i_pre - m_new)
        f_s = torch.exp(log_f + m - m_new)
        c_new = f_s * c + i_s * torch.tanh(z_pre)
        n_new = f_s * n + i_s
        h_new = torch.sigmoid(o_pre) * c_new / n_new
        return h_new, c_new, n_new, m_new

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple:
        """One step: (h, c, n, m) each (B, H) from x_t (B, I) and the previous state."""
        return self._cell(self._input_part(x_t), tuple(state))

    # --- calling --------------------------------------------------------------------------
    def _initial(self, hx, B: int, unbatched: bool, like: torch.Tensor) -> tuple:
        if hx is None:
            z = torch.zeros(B, self.hidden_size, dtype=like.dtype, device=like.device)
            return (z, z, z, z)
        if not isinstance(hx, (tuple, list)) or len(hx) != 4:
            raise ValueError("hx must be a tuple (h, c, n, m) of four (1, B, H) tensors for "
                             f"SLSTM; got {type(hx).__name__}")
        return tuple(self._initial_state(part, B, unbatched, like) for part in hx)

    def _run(self, x: torch.Tensor, hx):
        """Batch-major x (B, T, I) -> list of T states, and the initial state."""
        xb, unbatched = self._batch_major(x)
        if xb.shape[1] == 0:
            raise ValueError("inputs have T=0 time steps; at least one is needed")
        state0 = self._initial(hx, xb.shape[0], unbatched, xb)
        state, states = state0, []
        for wx_t in self._input_part(xb).unbind(1):  # unbind once: no O(T²) backward
            state = self._cell(wx_t, state)
            states.append(state)
        return xb, unbatched, state0, states

    def forward(self, x: torch.Tensor, hx=None):
        """(output, (h_n, c_n, n_n, m_n)): output (B, T, H) or (T, B, H), each part (1, B, H)."""
        _, unbatched, _, states = self._run(x, hx)
        out = torch.stack([s[0] for s in states], 1)
        last = states[-1]
        if unbatched:
            return out[0], tuple(part for part in last)
        return (out if self.batch_first else out.transpose(0, 1)), tuple(p.unsqueeze(0) for p in last)

    forward_steps = forward

    def hidden_states(self, x: torch.Tensor, hx=None) -> torch.Tensor:
        """h_t for all t, (B, T, H) batch-major."""
        _, _, _, states = self._run(x, hx)
        return torch.stack([s[0] for s in states], 1)

    def _trajectory(self, x, hx):
        """Stacked previous states (each (B, T, H)) and pre-activations (B, T, 4H)."""
        xb, _, state0, states = self._run(x, hx)
        prev = [torch.stack([p] + [s[k] for s in states[:-1]], 1) for k, p in enumerate(state0)]
        pre = self._input_part(xb) + prev[0] @ self.R.t()
        return prev, pre

    def decay(self, x: torch.Tensor, hx=None) -> torch.Tensor:
        """The forget gate f_t = exp(log f_t) (B, T, H) along the trajectory from hx."""
        _, pre = self._trajectory(x, hx)
        return torch.exp(self._log_f(pre.chunk(4, dim=-1)[2]))

    def highway(self, x: torch.Tensor, hx=None) -> torch.Tensor:
        """f'_t (B, T, H): the stabilised forget factor, the diagonal of ∂c_t/∂c_{t−1} and of
        ∂n_t/∂n_{t−1}."""
        (h, c, n, m), pre = self._trajectory(x, hx)
        log_f = self._log_f(pre.chunk(4, dim=-1)[2])
        i_pre = pre.chunk(4, dim=-1)[1]
        m_new = torch.maximum(log_f + m, i_pre)
        return torch.exp(log_f + m - m_new)

    def step_jacobian_fn(self, x: torch.Tensor, hx=None):
        """The closed-form step Jacobians a chunk at a time: runs the trajectory once (O(B·T·H)
        memory) and returns `at(steps, out=None) -> (B, S, 4H, 4H)`, ∂s_t/∂s_{t−1} for the S
        steps of the slice `steps` (module docstring). Memory per call is O(B·S·(4H)²): the
        analyses call it on chunks of `chunk_size` steps, so the T dense Jacobians are never
        held at once. `out`, a (B, S, 4H, 4H) tensor (a view is fine), receives the result: a
        caller that reduces chunk after chunk can reuse one buffer (fresh pages of a large new
        tensor cost more to touch than the Jacobians cost to compute).

        Example:
            >>> m, x = SLSTM(3, 4), torch.randn(2, 10, 3)
            >>> at = m.step_jacobian_fn(x)
            >>> assert torch.allclose(at(slice(2, 5)), m.step_jacobians(x)[:, 2:5])
        """
        prev, pre = self._trajectory(x, hx)
        T = pre.shape[1]
        # The buffer this function last filled, as (data_ptr, shape, strides, version after
        # the fill): handed back untouched (its version counter unchanged), its structural
        # zeros — 12 of the 16 H×H blocks but their diagonals — are still in place.
        last = [None]

        def at(steps: slice, out: torch.Tensor | None = None) -> torch.Tensor:
            if not isinstance(steps, slice) or steps.step not in (None, 1):
                raise TypeError(f"steps must be a contiguous slice of 0..T−1 (T={T}); got "
                                f"{steps!r}")
            key = None if out is None else (out.data_ptr(), out.shape, out.stride())
            zeroed = key is not None and last[0] == (*key, out._version)
            res = self._step_jacobians(tuple(p[:, steps] for p in prev), pre[:, steps], out,
                                       zeroed=zeroed)
            last[0] = None if key is None else (*key, res._version)
            return res

        return at

    def step_jacobians(self, x: torch.Tensor, hx=None, *, chunk_size: int | None = None
                       ) -> torch.Tensor:
        """Closed-form ∂s_t/∂s_{t−1} (B, T, 4H, 4H), s = (h, c, n, m) (module docstring).

        chunk_size: steps whose Jacobians are built at once (None: 16); the result is the same
        whatever its value, only the temporaries (≈ 20 (B, chunk, H, H) blocks) are bounded by
        it. The result itself is B·T·(4H)² values: for long sequences use `step_jacobian_fn`
        (or rnnscope's step_jacobians / cell_jacobians, which do) and reduce chunk by chunk.
        """
        chunk = 16 if chunk_size is None else chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
        at = self.step_jacobian_fn(x, hx)
        xb, _ = self._batch_major(x)
        B, T, M = xb.shape[0], xb.shape[1], 4 * self.hidden_size
        out = torch.empty(B, T, M, M, dtype=xb.dtype, device=xb.device)
        for start in range(0, T, chunk):
            sl = slice(start, min(start + chunk, T))
            at(sl, out=out[:, sl])
        return out

    def _step_jacobians(self, prev: tuple, pre: torch.Tensor, out: torch.Tensor | None = None,
                        *, zeroed: bool = False) -> torch.Tensor:
        """(B, S, 4H, 4H) from the previous states (each (B, S, H)) and pre-activations
        (B, S, 4H) of S steps, written into `out` if given (zeroed: its structural zeros are
        already in place).

        Every block of the h column is Σ_g diag(coef_g) R_g over the gates g = z, i, f, o (the
        module docstring's formulas expanded): one contraction of the (B, S, 4, 4, H)
        coefficients with R, written in place; the c, n, m columns are diagonal.
        """
        _, c_p, n_p, m_p = prev
        H = self.hidden_size
        B, S = pre.shape[:2]
        z_pre, i_pre, f_pre, o_pre = pre.chunk(4, dim=-1)  # (B, S, H)
        log_f = self._log_f(f_pre)
        lf_d = torch.ones_like(f_pre) if self.forget_gate == "exp" else torch.sigmoid(-f_pre)
        s = (log_f + m_p >= i_pre).to(pre.dtype)
        m = torch.maximum(log_f + m_p, i_pre)
        i_s, f_s = torch.exp(i_pre - m), torch.exp(log_f + m_p - m)
        z, o = torch.tanh(z_pre), torch.sigmoid(o_pre)
        c = f_s * c_p + i_s * z
        n = f_s * n_p + i_s

        # ∂(h, c, n, m)_t/∂h_{t−1} = Σ_g diag(coef_g) R_g: the nonzero coefficients, (B, S, H)
        # each, keyed by gate index (z 0, i 1, f 2, o 3)
        dm = {1: 1 - s, 2: s * lf_d}  # ∂m_t/∂h_{t−1}
        dfs = {1: -f_s * dm[1], 2: f_s * (lf_d - dm[2])}  # ∂f'/∂h_{t−1}
        dis = {1: i_s * (1 - dm[1]), 2: -i_s * dm[2]}  # ∂i'/∂h_{t−1}
        dc = {0: i_s * (1 - z * z), **{g: c_p * dfs[g] + z * dis[g] for g in (1, 2)}}
        dn = {g: n_p * dfs[g] + dis[g] for g in (1, 2)}
        a, b = o / n, o * c / (n * n)  # ∂h/∂c, −∂h/∂n
        dh = {0: a * dc[0], **{g: a * dc[g] - b * dn[g] for g in (1, 2)}, 3: c / n * o * (1 - o)}

        if out is None:
            out = torch.empty(B, S, 4 * H, 4 * H, dtype=pre.dtype, device=pre.device)
        blocks = out.view(B, S, 4, H, 4, H)  # [b, s, row block, row, column block, column]
        R = self.R.view(4, H, H)
        for q, coef in enumerate((dh, dc, dn, dm)):  # one pass per term, in place
            target = blocks[:, :, q, :, 0]  # (B, S, H, H)
            first, *rest = coef.items()
            if torch.is_grad_enabled():  # out= does not record a graph
                target.copy_(first[1].unsqueeze(-1) * R[first[0]])
            else:
                torch.mul(first[1].unsqueeze(-1), R[first[0]], out=target)  # no temporary
            for g, v in rest:
                target.addcmul_(v.unsqueeze(-1), R[g])
        if not zeroed:
            blocks[:, :, :, :, 1:] = 0
        # ∂f'/∂m_{t−1} = f'(1 − s), ∂i'/∂m_{t−1} = −i' s
        dc_dm = c_p * f_s * (1 - s) - z * i_s * s
        dn_dm = n_p * f_s * (1 - s) - i_s * s
        diagonals = {(0, 1): a * f_s, (0, 2): -b * f_s, (0, 3): a * dc_dm - b * dn_dm,
                     (1, 1): f_s, (1, 3): dc_dm, (2, 2): f_s, (2, 3): dn_dm, (3, 3): s}
        for (q, p), v in diagonals.items():
            blocks[:, :, q, :, p].diagonal(dim1=-2, dim2=-1).copy_(v)
        return out
