"""minGRU (Feng et al. 2024, "Were RNNs all we needed?").

    z_t = σ(W_z x_t + b_z)                          (B, H)  update gate, from x_t only
    h̃_t = g(W_h x_t + b_h)                          (B, H)  candidate
    h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t

    g(v) = v + ½ for v ≥ 0,  σ(v) for v < 0         (positive, continuous, so log h̃ exists)

Linear in h with a_t = 1 − z_t = σ(−(W_z x_t + b_z)), b_t = z_t ⊙ h̃_t. ∂h_t/∂h_{t−1} =
diag(1 − z_t) is the whole step Jacobian; the memory time of unit j is 1/z_t.

The paper's log-space parallel mode computes log h_t from log a_t = −softplus(k_z),
log z_t = −softplus(−k_z), log h̃_t = log g(k_h) (scan="log"); it needs h_0 > 0. The default
scan="blocked" computes the same values without logarithms and for any h_0.
hx is the state itself, as in the paper's sequential mode and nn.GRU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import DiagonalLinearRecurrence
from .scan import log_space_scan

SCANS = ("blocked", "log")


def g(v: torch.Tensor) -> torch.Tensor:
    """minGRU's activation: v + ½ for v ≥ 0, σ(v) for v < 0 (positive everywhere)."""
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def log_g(v: torch.Tensor) -> torch.Tensor:
    """log g(v), computed without forming g(v) where it would underflow."""
    return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), -F.softplus(-v))


class MinGRU(DiagonalLinearRecurrence):
    """minGRU layer. State h (B, H); output = h.

    Args:
        input_size: I.
        hidden_size: H.
        batch_first: x is (B, T, I) if True (default), else (T, B, I).
        scan: "blocked" (default, modern/scan.linear_scan) or "log" (the paper's log-space
            scan; needs a positive initial state).

    Example:
        >>> m = MinGRU(3, 5); y, h = m(torch.randn(2, 7, 3))
        >>> assert y.shape == (2, 7, 5) and h.shape == (1, 2, 5)
    """

    parameter_groups = {"recurrence": ("linear_z",), "input": ("linear_h",)}

    def __init__(self, input_size: int, hidden_size: int, *, batch_first: bool = True,
                 scan: str = "blocked", device=None, dtype=None):
        super().__init__(input_size, hidden_size, batch_first=batch_first)
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}; got {scan!r}")
        self.scan = scan
        kw = {"device": device, "dtype": dtype}
        self.linear_z = nn.Linear(input_size, hidden_size, **kw)
        self.linear_h = nn.Linear(input_size, hidden_size, **kw)

    def coefficients(self, x):
        k_z = self.linear_z(x)  # (B, T, H)
        # a = 1 − z = σ(−k_z) and z = σ(k_z) as exp(−softplus(·)): exact to rounding at both
        # ends, gradients included (σ's backward, σ(1 − σ) from the output, loses digits at 1)
        a = torch.exp(-F.softplus(k_z))
        z = torch.exp(-F.softplus(-k_z))
        return a, z * g(self.linear_h(x))

    def _scan(self, a, b, h0, x):
        if self.scan == "blocked":
            return super()._scan(a, b, h0, x)
        if bool((h0 < 0).any()) or (bool((h0 == 0).any()) and not bool((h0 == 0).all())):
            raise ValueError("scan='log' needs an initial state that is all zero or all "
                             "positive (it works with log h); use scan='blocked' for this hx")
        k_z = self.linear_z(x)
        log_h0 = None if bool((h0 == 0).all()) else torch.log(h0)
        return log_space_scan(-F.softplus(k_z), -F.softplus(-k_z) + log_g(self.linear_h(x)),
                              log_h0)
