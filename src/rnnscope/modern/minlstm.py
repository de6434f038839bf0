"""minLSTM (Feng et al. 2024, "Were RNNs all we needed?"), the length-independent-scale form.

    f_t = σ(W_f x_t + b_f),  i_t = σ(W_i x_t + b_i)               (B, H), from x_t only
    f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)           normalised, f' + i' = 1
    h̃_t = g(W_h x_t + b_h)                                        g as in minGRU
    h_t = f'_t ⊙ h_{t−1} + i'_t ⊙ h̃_t

Linear in h with a_t = f'_t, b_t = i'_t ⊙ h̃_t; ∂h_t/∂h_{t−1} = diag(f'_t) is the whole step
Jacobian. f' and i' are computed as the paper's log-space code does: with
d = softplus(−k_f) − softplus(−k_i) (= log i − log f), f' = σ(−d), i' = σ(d).

scan="log" is the paper's log-space scan (log f' = −softplus(d), log i' = −softplus(−d),
log h̃ = log g(k_h)); it needs h_0 > 0. The default scan="blocked" needs no logarithms.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import DiagonalLinearRecurrence
from .mingru import SCANS, g, log_g
from .scan import log_space_scan


class MinLSTM(DiagonalLinearRecurrence):
    """minLSTM layer. State h (B, H); output = h.

    Args:
        input_size: I.
        hidden_size: H.
        batch_first: x is (B, T, I) if True (default), else (T, B, I).
        scan: "blocked" (default) or "log" (the paper's log-space scan; positive h_0 only).

    Example:
        >>> m = MinLSTM(3, 5); y, h = m(torch.randn(2, 7, 3))
        >>> assert y.shape == (2, 7, 5) and h.shape == (1, 2, 5)
    """

    parameter_groups = {"recurrence": ("linear_f", "linear_i"), "input": ("linear_h",)}

    def __init__(self, input_size: int, hidden_size: int, *, batch_first: bool = True,
                 scan: str = "blocked", device=None, dtype=None):
        super().__init__(input_size, hidden_size, batch_first=batch_first)
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}; got {scan!r}")
        self.scan = scan
        kw = {"device": device, "dtype": dtype}
        self.linear_f = nn.Linear(input_size, hidden_size, **kw)
        self.linear_i = nn.Linear(input_size, hidden_size, **kw)
        self.linear_h = nn.Linear(input_size, hidden_size, **kw)

    def _log_ratio(self, x):
        """d = log i − log f (B, T, H)."""
        return F.softplus(-self.linear_f(x)) - F.softplus(-self.linear_i(x))

    def coefficients(self, x):
        d = self._log_ratio(x)
        # f' = σ(−d), i' = σ(d) as exp(−softplus(·)) (the paper's log f', log i'): accurate
        # values and gradients whether f' is near 0 or near 1
        return torch.exp(-F.softplus(d)), torch.exp(-F.softplus(-d)) * g(self.linear_h(x))

    def _scan(self, a, b, h0, x):
        if self.scan == "blocked":
            return super()._scan(a, b, h0, x)
        if bool((h0 < 0).any()) or (bool((h0 == 0).any()) and not bool((h0 == 0).all())):
            raise ValueError("scan='log' needs an initial state that is all zero or all "
                             "positive (it works with log h); use scan='blocked' for this hx")
        d = self._log_ratio(x)
        log_h0 = None if bool((h0 == 0).all()) else torch.log(h0)
        return log_space_scan(-F.softplus(d), -F.softplus(-d) + log_g(self.linear_h(x)), log_h0)
