"""LRU, the Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting recurrent neural
networks for long sequences").

    λ_j = exp(−exp(ν_j) + i·exp(θ_j))           ν = nu_log, θ = theta_log  (N,) complex, |λ| < 1
    γ_j = exp(γ_log_j)                           input normalisation, init sqrt(1 − |λ_j|²)
    h_t = λ ⊙ h_{t−1} + γ ⊙ (B u_t)              h (B, N) complex, B = B_re + i B_im (N, I)
    y_t = Re(C h_t) + D ⊙ u_t                    y (B, I) real, C = C_re + i C_im (I, N), D (I,)

Shapes: input u_t and output y_t both have the model width I = input_size (as in the paper);
hidden_size = N, the number of complex state units.

Exposed state: hx / h_n are COMPLEX (1, B, N) (a real hx is accepted and cast); the output is
real. `decay(x)` returns λ broadcast to (B, T, N), complex; |λ_j| is unit j's per-step decay,
memory time 1/(1 − |λ_j|), and arg λ_j its rotation per step.

∂h_t/∂h_{t−1} = diag(λ) (complex, i.e. on (Re h, Im h) each unit is the 2×2 block
[[Re λ, −Im λ], [Im λ, Re λ]]) — the whole Jacobian, the same at every step.

Initialisation (the paper's): ν, θ from the ring r_min ≤ |λ| ≤ r_max, arg λ ∈ [0, max_phase]:
u1, u2 ~ U(0, 1), ν_log = log(−½ log(u1 (r_max² − r_min²) + r_min²)), θ_log = log(max_phase u2);
B_re, B_im ~ N(0, 1/(2I)), C_re, C_im ~ N(0, 1/N), D ~ N(0, 1), γ_log = log sqrt(1 − |λ|²).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import DiagonalLinearRecurrence


class LRU(DiagonalLinearRecurrence):
    """Linear Recurrent Unit. State h (B, N) complex; output (B, T, I) real.

    Args:
        input_size: I (also the output width).
        hidden_size: N, the number of complex state units.
        batch_first: x is (B, T, I) if True (default), else (T, B, I).
        r_min, r_max: ring of the initial |λ| (paper defaults 0 and 1).
        max_phase: largest initial arg λ (paper default 6.28).

    Example:
        >>> m = LRU(3, 5); y, h = m(torch.randn(2, 7, 3))
        >>> assert y.shape == (2, 7, 3) and h.shape == (1, 2, 5) and h.is_complex()
    """

    parameter_groups = {"recurrence": ("nu_log", "theta_log"),
                        "input": ("gamma_log", "B_re", "B_im"),
                        "output": ("C_re", "C_im", "D")}

    def __init__(self, input_size: int, hidden_size: int, *, batch_first: bool = True,
                 r_min: float = 0.0, r_max: float = 1.0, max_phase: float = 6.28,
                 device=None, dtype=None):
        super().__init__(input_size, hidden_size, batch_first=batch_first)
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"need 0 ≤ r_min < r_max ≤ 1; got r_min={r_min}, r_max={r_max}")
        kw = {"device": device, "dtype": dtype}
        N, I = self.hidden_size, self.input_size
        u1, u2 = torch.rand(N, **kw), torch.rand(N, **kw)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))
        theta_log = torch.log(max_phase * u2)
        lam_abs = torch.exp(-torch.exp(nu_log))
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - lam_abs ** 2)))
        self.B_re = nn.Parameter(torch.randn(N, I, **kw) / math.sqrt(2 * I))
        self.B_im = nn.Parameter(torch.randn(N, I, **kw) / math.sqrt(2 * I))
        self.C_re = nn.Parameter(torch.randn(I, N, **kw) / math.sqrt(N))
        self.C_im = nn.Parameter(torch.randn(I, N, **kw) / math.sqrt(N))
        self.D = nn.Parameter(torch.randn(I, **kw))

    @property
    def state_dtype(self) -> torch.dtype:
        return self.nu_log.dtype.to_complex()

    def eigenvalues(self) -> torch.Tensor:
        """λ (N,), complex."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def coefficients(self, x):
        lam = self.eigenvalues()  # (N,)
        Bu = torch.complex(x @ self.B_re.t(), x @ self.B_im.t())  # (B, T, N)
        b = torch.exp(self.gamma_log) * Bu
        return lam.expand_as(b), b

    def readout(self, x, states):
        # Re(C h) by one complex product (contiguous, unlike the strided .real/.imag views)
        return (states @ torch.complex(self.C_re, self.C_im).t()).real + self.D * x
