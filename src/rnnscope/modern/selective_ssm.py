"""A diagonal selective state-space layer, S6-style (Gu & Dao 2023, "Mamba"), one channel group.

Reference implementation of the selective scan with H channels and N states per channel:

    u_t = W_in x_t + b_in                                  (B, H)   channels
    Δ_t = softplus(W_Δ↑ (W_Δ↓ u_t) + b_Δ)                  (B, H)   step size, rank-R map
    B_t = W_B u_t,  C_t = W_C u_t                          (B, N)   shared by all channels
    A = −exp(A_log)                                        (H, N)   negative real
    ā_t = exp(Δ_t[d] A[d, n])                              (B, H, N)  decay, in (0, 1)
    h_t[d, n] = ā_t[d, n] h_{t−1}[d, n] + Δ_t[d] B_t[n] u_t[d]    (B̄x ≈ Δ·B·x, Mamba's
                                                                     simplified discretisation)
    y_t[d] = Σ_n C_t[n] h_t[d, n] + D[d] u_t[d]            (B, H)

State (B, H, N); hx / h_n are (1, B, H, N). Linear in h: ∂h_t/∂h_{t−1} = diag(ā_t) is the whole
step Jacobian and `decay(x)` returns ā (B, T, H, N); each (d, n) is a unit with memory time
1/(1 − ā). Mamba's gate branch and short convolution around the scan are not part of the
recurrence and are left out.

Initialisation as Mamba: A[d, n] = −(n + 1) (S4D-real), D = 1, b_Δ = softplus⁻¹(Δ₀) with Δ₀
log-uniform in [dt_min, dt_max] = [0.001, 0.1], R = ceil(H / 16).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import DiagonalLinearRecurrence


class SelectiveSSM(DiagonalLinearRecurrence):
    """Selective SSM (S6) layer. State h (B, H, N); output (B, T, H).

    Args:
        input_size: I.
        hidden_size: H, the number of channels.
        batch_first: x is (B, T, I) if True (default), else (T, B, I).
        state_size: N, states per channel (Mamba: 16).
        dt_rank: R, rank of the Δ map (default ceil(H / 16)).
        dt_min, dt_max: range of the initial Δ.

    Example:
        >>> m = SelectiveSSM(3, 5, state_size=4); y, h = m(torch.randn(2, 7, 3))
        >>> assert y.shape == (2, 7, 5) and h.shape == (1, 2, 5, 4)
    """

    parameter_groups = {"recurrence": ("A_log", "dt_down", "dt_up"),
                        "input": ("in_proj", "B_proj"),
                        "output": ("C_proj", "D")}

    def __init__(self, input_size: int, hidden_size: int, *, batch_first: bool = True,
                 state_size: int = 16, dt_rank: int | None = None, dt_min: float = 0.001,
                 dt_max: float = 0.1, device=None, dtype=None):
        super().__init__(input_size, hidden_size, batch_first=batch_first)
        if int(state_size) < 1:
            raise ValueError(f"state_size must be ≥ 1; got {state_size}")
        kw = {"device": device, "dtype": dtype}
        H, N = self.hidden_size, int(state_size)
        R = math.ceil(H / 16) if dt_rank is None else int(dt_rank)
        self.state_size, self.dt_rank = N, R
        self.in_proj = nn.Linear(input_size, H, **kw)
        self.dt_down = nn.Linear(H, R, bias=False, **kw)
        self.dt_up = nn.Linear(R, H, **kw)
        self.B_proj = nn.Linear(H, N, bias=False, **kw)
        self.C_proj = nn.Linear(H, N, bias=False, **kw)
        dt0 = torch.exp(torch.rand(H, **kw) * (math.log(dt_max) - math.log(dt_min))
                        + math.log(dt_min)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_up.bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus⁻¹(dt0)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, **kw)).repeat(H, 1))
        self.D = nn.Parameter(torch.ones(H, **kw))

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.hidden_size, self.state_size)

    def coefficients(self, x):
        u = self.in_proj(x)  # (B, T, H)
        delta = F.softplus(self.dt_up(self.dt_down(u)))  # (B, T, H)
        A = -torch.exp(self.A_log)  # (H, N)
        a = torch.exp(delta.unsqueeze(-1) * A)  # (B, T, H, N)
        b = (delta * u).unsqueeze(-1) * self.B_proj(u).unsqueeze(-2)  # (B, T, H, N)
        return a, b

    def readout(self, x, states):
        u = self.in_proj(x)  # (B, T, H)
        C = self.C_proj(u)  # (B, T, N)
        return (states * C.unsqueeze(-2)).sum(-1) + self.D * u
