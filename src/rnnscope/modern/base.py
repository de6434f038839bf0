"""What every modern recurrence here shares: nn.GRU-style calling and, for the ones linear in
their state, the scan forward and the diagonal step Jacobian.

Calling convention (as nn.GRU): `forward(x, hx=None) -> (output, h_n)`.
- x: (B, T, I) if batch_first (the default here), else (T, B, I); or (T, I) unbatched.
- hx / h_n: (1, B, *S) — the state after the last step, S the state shape ((H,) for most, (N,)
  complex for the LRU, (H, N) for the selective SSM); (1, *S) when unbatched.
- output: (B, T, O) (or (T, B, O)), O the output width.

Cell form: `step(x_t, state) -> new_state` (as nn.GRUCell), x_t (B, I), state (B, *S).
`readout(x, states) -> output` turns states (B, T, *S) into outputs; `hidden_states(x, hx)`
gives all states (B, T, *S) batch-major.

For a recurrence h_t = a_t ⊙ h_{t−1} + b_t whose a_t, b_t depend on x_t only
(`linear_in_state = True`):
- forward runs `linear_scan` (modern/scan.py); `forward_steps` is the sequential loop of
  `step`, kept as the reference;
- ∂h_t/∂h_{t−1} = diag(a_t) exactly: the "highway" (the diagonal decay) is the WHOLE step
  Jacobian, there are no indirect paths. `decay(x)` returns a_t (B, T, *S), like LSTM's f;
  `step_jacobians(x)` returns the same diagonal.
"""

from __future__ import annotations

import torch
from torch import nn

from .scan import linear_scan


class ModernRecurrence(nn.Module):
    """Input/state validation and layout shared by the modern recurrences."""

    linear_in_state: bool = False
    # Parameter roles for parameter_sensitivity: group -> parameter names or module prefixes.
    parameter_groups: dict[str, tuple[str, ...]] = {}

    def __init__(self, input_size: int, hidden_size: int, *, batch_first: bool = True):
        super().__init__()
        if int(input_size) < 1 or int(hidden_size) < 1:
            raise ValueError(f"input_size and hidden_size must be ≥ 1; got {input_size}, "
                             f"{hidden_size}")
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.batch_first = bool(batch_first)

    # --- what subclasses define -------------------------------------------------------------
    @property
    def state_shape(self) -> tuple[int, ...]:
        """S: the shape of one sample's state."""
        return (self.hidden_size,)

    @property
    def state_dtype(self) -> torch.dtype:
        return self._param_dtype()

    def readout(self, x: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Outputs (B, T, O) from inputs x (B, T, I) and states (B, T, *S). Default: y = h."""
        return states

    # --- layout helpers ---------------------------------------------------------------------
    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _batch_major(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """x as (B, T, I), and whether it came unbatched."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} input must be a tensor; got {type(x).__name__}")
        layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise ValueError(f"inputs must be {layout} or unbatched (T, I) with I={self.input_size} "
                             f"for this {type(self).__name__} (batch_first={self.batch_first}); "
                             f"got {tuple(x.shape)}")
        if x.dtype != self._param_dtype():
            raise TypeError(f"inputs are {x.dtype} but {type(self).__name__}'s parameters are "
                            f"{self._param_dtype()}; convert one with .to(dtype)")
        if x.dim() == 2:
            return x.unsqueeze(0), True
        return (x if self.batch_first else x.transpose(0, 1)), False

    def _initial_state(self, hx, B: int, unbatched: bool, like: torch.Tensor) -> torch.Tensor:
        """h0 (B, *S) from hx (1, B, *S) / (1, *S), zeros if None."""
        S = self.state_shape
        if hx is None:
            return torch.zeros(B, *S, dtype=self.state_dtype, device=like.device)
        want = (1, *S) if unbatched else (1, B, *S)
        if not isinstance(hx, torch.Tensor) or tuple(hx.shape) != want:
            got = tuple(hx.shape) if isinstance(hx, torch.Tensor) else type(hx).__name__
            raise ValueError(f"hx must be {want} (1, B, *state) for this {type(self).__name__}; "
                             f"got {got}")
        h0 = hx[0]
        return (h0.unsqueeze(0) if unbatched else h0).to(self.state_dtype)

    def _to_caller(self, out: torch.Tensor, h_last: torch.Tensor, unbatched: bool):
        if unbatched:
            return out[0], h_last
        return (out if self.batch_first else out.transpose(0, 1)), h_last.unsqueeze(0)


class DiagonalLinearRecurrence(ModernRecurrence):
    """h_t = a_t ⊙ h_{t−1} + b_t with a_t, b_t functions of x_t alone (see module docstring)."""

    linear_in_state = True

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (B, T, *S), from batch-major x (B, T, I)."""
        raise NotImplementedError

    def _scan(self, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, x: torch.Tensor):
        return linear_scan(a, b, h0)

    def hidden_states(self, x: torch.Tensor, hx=None) -> torch.Tensor:
        """All states (B, T, *S), batch-major, by the parallel scan."""
        xb, unbatched = self._batch_major(x)
        h0 = self._initial_state(hx, xb.shape[0], unbatched, xb)
        a, b = self.coefficients(xb)
        return self._scan(a, b, h0, xb)

    def forward(self, x: torch.Tensor, hx=None):
        """(output, h_n): output (B, T, O) or (T, B, O); h_n (1, B, *S). Parallel scan."""
        xb, unbatched = self._batch_major(x)
        if xb.shape[1] == 0:
            raise ValueError("inputs have T=0 time steps; at least one is needed")
        h0 = self._initial_state(hx, xb.shape[0], unbatched, xb)
        a, b = self.coefficients(xb)
        h = self._scan(a, b, h0, xb)
        return self._to_caller(self.readout(xb, h), h[:, -1], unbatched)

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One step: h_t (B, *S) from x_t (B, I) and h_{t−1} (B, *S)."""
        a, b = self.coefficients(x_t.unsqueeze(1))
        return a[:, 0] * state + b[:, 0]

    def forward_steps(self, x: torch.Tensor, hx=None):
        """The same as forward, by the sequential loop of `step` (the reference)."""
        xb, unbatched = self._batch_major(x)
        if xb.shape[1] == 0:
            raise ValueError("inputs have T=0 time steps; at least one is needed")
        h = self._initial_state(hx, xb.shape[0], unbatched, xb)
        hs = []
        for x_t in xb.unbind(1):
            h = self.step(x_t, h)
            hs.append(h)
        states = torch.stack(hs, 1)
        return self._to_caller(self.readout(xb, states), states[:, -1], unbatched)

    def decay(self, x: torch.Tensor) -> torch.Tensor:
        """The per-step decay a_t (B, T, *S), batch-major (complex for the LRU)."""
        xb, _ = self._batch_major(x)
        a, b = self.coefficients(xb)
        return a.expand_as(b)

    def step_jacobians(self, x: torch.Tensor, hx=None) -> torch.Tensor:
        """∂h_t/∂h_{t−1} = diag(a_t): returns the diagonal a_t (B, T, *S). It is the whole
        Jacobian (the recurrence is linear in h, so there are no indirect paths); hx is not
        needed and is accepted for a uniform signature."""
        return self.decay(x)
