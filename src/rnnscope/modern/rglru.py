"""RG-LRU, the Real-Gated Linear Recurrent Unit of Griffin (De et al. 2024).

    u_t = W_u x_t + b_u                              (B, H)  the layer's input map (Griffin's
                                                             preceding linear layer)
    r_t = σ(W_a u_t + b_a)                           (B, H)  recurrence gate
    i_t = σ(W_x u_t + b_x)                           (B, H)  input gate
    a_t = a^(c·r_t),  a = σ(Λ)                       log a_t = −c·softplus(−Λ)·r_t, c = 8
    h_t = a_t ⊙ h_{t−1} + sqrt(1 − a_t²) ⊙ (i_t ⊙ u_t)

Linear in h; ∂h_t/∂h_{t−1} = diag(a_t) is the whole step Jacobian, memory time 1/(1 − a_t).
sqrt(1 − a_t²) is computed as sqrt(−expm1(2 log a_t)) so that a_t near 1 loses no digits.

Griffin's gate weights are block-diagonal and a short convolution precedes the RG-LRU; here
the gate weights are dense (the general case) and the convolution, not part of the
recurrence, is left out. Λ is initialised so that a^c is uniform in [0.9, 0.999] (Griffin).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import DiagonalLinearRecurrence


class RGLRU(DiagonalLinearRecurrence):
    """Griffin's RG-LRU layer. State h (B, H); output = h.

    Args:
        input_size: I.
        hidden_size: H.
        batch_first: x is (B, T, I) if True (default), else (T, B, I).
        c: the gate's exponent scale (Griffin: 8).
        a_min, a_max: range of the initial a^c (Griffin: 0.9, 0.999).

    Example:
        >>> m = RGLRU(3, 5); y, h = m(torch.randn(2, 7, 3))
        >>> assert y.shape == (2, 7, 5) and h.shape == (1, 2, 5)
    """

    parameter_groups = {"recurrence": ("a_param", "gate_a"), "input": ("gate_x", "linear_u")}

    def __init__(self, input_size: int, hidden_size: int, *, batch_first: bool = True,
                 c: float = 8.0, a_min: float = 0.9, a_max: float = 0.999,
                 device=None, dtype=None):
        super().__init__(input_size, hidden_size, batch_first=batch_first)
        if not 0.0 < a_min < a_max < 1.0:
            raise ValueError(f"need 0 < a_min < a_max < 1; got {a_min}, {a_max}")
        kw = {"device": device, "dtype": dtype}
        H = self.hidden_size
        self.c = float(c)
        self.linear_u = nn.Linear(input_size, H, **kw)
        self.gate_a = nn.Linear(H, H, **kw)
        self.gate_x = nn.Linear(H, H, **kw)
        a_c = a_min + (a_max - a_min) * torch.rand(H, **kw)  # a^c ~ U(a_min, a_max)
        a = a_c ** (1.0 / self.c)
        self.a_param = nn.Parameter(torch.log(a) - torch.log1p(-a))  # Λ = logit(a)

    def coefficients(self, x):
        u = self.linear_u(x)  # (B, T, H)
        r = torch.sigmoid(self.gate_a(u))
        i = torch.sigmoid(self.gate_x(u))
        log_a = -self.c * F.softplus(-self.a_param) * r
        a = torch.exp(log_a)
        return a, torch.sqrt(-torch.expm1(2 * log_a)) * (i * u)
