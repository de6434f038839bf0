"""The one parallel scan every diagonal linear recurrence here runs on.

The recurrence, elementwise over every axis after time:

    h_t = a_t ⊙ h_{t−1} + b_t,      t = 0..T−1,   h_{−1} = h0 (zeros if not given)

a, b: (B, T, *S) real or complex, h0: (B, *S). S is the state shape: (H,) for minGRU, minLSTM,
RG-LRU, (N,) complex for the LRU, (H, N) for the selective SSM.

Forward: a blocked (chunked) scan on the associative pair (a, b) ∘ (a', b') = (a a', a' b + b').
Blocks of C ≈ √T steps run side by side, their end states are scanned the same way, and the
carries are added back: O(T) work, about 2√T vectorised steps. Only products and sums of the
coefficients appear — no division and no logarithm — so a decay close to 0 (or exactly 0)
only makes products underflow towards their true limit 0, and with |a_t| ≤ 1 nothing grows
beyond Σ|b_t|. Its rounding is that of the sequential loop up to a different association of
the same sums. (A Hillis–Steele doubling scan has the same safety but O(T log T) memory
traffic; on a CPU the blocked form is several times faster.)

Backward (one custom autograd.Function, so autograd stores O(T) tensors, not one per round):
the adjoint of a linear scan is a linear scan run backwards in time,

    δ_t = g_t + conj(a_{t+1}) δ_{t+1},   δ_{T−1} = g_{T−1}
    ∂L/∂b_t = δ_t,   ∂L/∂a_t = δ_t ⊙ conj(h_{t−1}),   ∂L/∂h0 = conj(a_0) δ_0

(conj for PyTorch's complex-gradient convention; a no-op for real tensors). The backward calls
the same Function, so double backward works. Forward mode (torch.func.jvp / jacfwd) is the
scan of the tangent: ḣ_t = a_t ḣ_{t−1} + ȧ_t h_{t−1} + ḃ_t.

`log_space_scan` is the log-space form of Feng et al. (2024) (after Heinsen 2023) for positive
coefficients and values, kept for minGRU/minLSTM's `scan="log"`: its error grows like
eps·|Σ_s log a_s|, so the blocked scan is the default.
"""

from __future__ import annotations

import math

import torch


def _within_blocks(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan from a zero state inside every block at once. a, b (B, n, C, *S): n blocks of C
    steps. Returns (running decay product ∏ a, local state h), both (B, n, C, *S).

    A loop over the C positions, each step one fused multiply-add on all n blocks together.
    The position axis is moved to the front and made contiguous first, so that every step
    works on one contiguous slab (strided slices are several times slower on a CPU).
    """
    a_steps = a.movedim(2, 0).contiguous().unbind(0)
    b_steps = b.movedim(2, 0).contiguous().unbind(0)
    h, prod = b_steps[0], a_steps[0]
    hs, prods = [h], [prod]
    for a_k, b_k in zip(a_steps[1:], b_steps[1:]):
        h = torch.addcmul(b_k, a_k, h)
        prod = prod * a_k
        hs.append(h)
        prods.append(prod)
    return torch.stack(prods, 0).movedim(0, 2), torch.stack(hs, 0).movedim(0, 2)


def _blocked_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Blocked scan over dim 1. a, b (B, T, *S); h0 (B, *S). Returns h (B, T, *S)."""
    a = a.expand_as(b)
    # Fold h0 into the first step: h_0 = a_0 h0 + b_0, after which the scan starts from zero.
    b = torch.cat([torch.addcmul(b[:, :1], a[:, :1], h0.unsqueeze(1)), b[:, 1:]], dim=1)
    return _blocked(a, b)


def _blocked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Blocks of C ≈ √T steps are scanned side by side, the n = T/C block ends are scanned
    the same way (recursively), and each block then adds its carried-in state times its
    running decay product: about 2√T short loop iterations instead of T, and only products and
    sums of the coefficients, never a quotient.
    """
    B, T, S = b.shape[0], b.shape[1], b.shape[2:]
    C = max(8, math.isqrt(T - 1) + 1)
    if T <= C:
        return _within_blocks(a.unsqueeze(1), b.unsqueeze(1))[1].squeeze(1)
    n = -(-T // C)
    pad = n * C - T
    if pad:  # steps with a = 1, b = 0 at the end change nothing before them
        a = torch.cat([a, torch.ones_like(a[:, :1]).expand(B, pad, *S)], dim=1)
        b = torch.cat([b, torch.zeros_like(b[:, :1]).expand(B, pad, *S)], dim=1)
    a_loc, h_loc = _within_blocks(a.reshape(B, n, C, *S), b.reshape(B, n, C, *S))
    ends = _blocked(a_loc[:, :, -1], h_loc[:, :, -1])  # (B, n, *S): state after each block
    carry_in = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1).unsqueeze(2)
    h = torch.addcmul(h_loc, a_loc, carry_in).reshape(B, n * C, *S)
    return h[:, :T] if pad else h


def _shift_prev(h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_{t−1} for every t: (B, T, *S) with h0 first."""
    return torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)


class _LinearScan(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, h0):
        return _blocked_scan(a, b, h0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, h0 = inputs
        ctx.save_for_backward(a, h0, output)
        ctx.save_for_forward(a, h0, output)

    @staticmethod
    def backward(ctx, g):
        a, h0, h = ctx.saved_tensors
        a_c = a.conj()
        # Coefficients of the time-reversed adjoint scan: δ_t picks up conj(a_{t+1}) δ_{t+1}.
        a_next = torch.cat([a_c[:, 1:], torch.zeros_like(a_c[:, :1])], dim=1)
        delta = _LinearScan.apply(a_next.flip(1), g.flip(1), torch.zeros_like(g[:, 0])).flip(1)
        grad_a = delta * _shift_prev(h, h0).conj()
        grad_h0 = a_c[:, 0] * delta[:, 0]
        return grad_a, delta, grad_h0

    @staticmethod
    def jvp(ctx, da, db, dh0):
        a, h0, h = ctx.saved_tensors
        tangent_b = torch.zeros_like(h) if db is None else db.expand_as(h)
        if da is not None:
            tangent_b = tangent_b + da * _shift_prev(h, h0)
        tangent_h0 = torch.zeros_like(h0) if dh0 is None else dh0
        return _blocked_scan(a, tangent_b, tangent_h0)


def _broadcasts_to(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of h_t = a_t ⊙ h_{t−1} + b_t, by a parallel (blocked) scan over dim 1.

    Args:
        a: (B, T, *S) decays, real or complex (broadcastable to b's shape).
        b: (B, T, *S) inputs.
        h0: (B, *S) state before the first step; zeros if None.

    Returns:
        h: (B, T, *S), h[:, t] the state after step t.

    Example:
        >>> a = torch.full((1, 3, 1), 0.5); b = torch.ones(1, 3, 1)
        >>> linear_scan(a, b)[0, :, 0].tolist()
        [1.0, 1.5, 1.75]
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"linear_scan: a and b must be tensors; got {type(a).__name__} and "
                        f"{type(b).__name__}")
    if b.dim() < 2:
        raise ValueError(f"linear_scan: b must be (B, T, *S); got {tuple(b.shape)}")
    if a.shape != b.shape and not _broadcasts_to(a.shape, b.shape):
        raise ValueError(f"linear_scan: a must be (B, T, *S) like b {tuple(b.shape)} or "
                         f"broadcastable to it; got {tuple(a.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a = a.to(dtype).expand_as(b) if a.shape != b.shape else a.to(dtype)
    b = b.to(dtype)
    if h0 is None:
        h0 = torch.zeros_like(b[:, 0])
    else:
        h0 = h0.to(dtype)
        if h0.shape != b[:, 0].shape:
            raise ValueError(f"linear_scan: h0 must be {tuple(b[:, 0].shape)} (b without its "
                             f"time axis); got {tuple(h0.shape)}")
    if b.shape[1] == 0:
        return b
    return _LinearScan.apply(a, b, h0)


def log_space_scan(log_a: torch.Tensor, log_b: torch.Tensor,
                   log_h0: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = a_t h_{t−1} + b_t for positive a, b, h0 given by their logarithms (Heinsen 2023,
    as used by Feng et al. 2024 for minGRU/minLSTM):

        a*_t = Σ_{s≤t} log a_s,   log h_t = a*_t + logcumsumexp_s(log b_s − a*_s)

    with log h0 entering as an extra first term. Differentiable by ordinary autograd. Its
    absolute error in log h_t is about eps·|a*_t| (a*_t and the logcumsumexp cancel), so long
    sequences with strong decay lose digits; `linear_scan` has no such loss.

    Args:
        log_a, log_b: (B, T, *S) real.
        log_h0: (B, *S) or None (h0 = 0, i.e. log h0 = −inf).

    Returns:
        h: (B, T, *S) = exp(log h).
    """
    a_star = torch.cumsum(log_a, dim=1)
    terms = log_b - a_star
    if log_h0 is not None:
        terms = torch.cat([log_h0.unsqueeze(1), terms], dim=1)
        log_h = torch.logcumsumexp(terms, dim=1)[:, 1:] + a_star
    else:
        log_h = torch.logcumsumexp(terms, dim=1) + a_star
    return torch.exp(log_h)
