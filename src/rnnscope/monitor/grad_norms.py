"""Gradient norms for the monitor's cheap statistics, fused and in the gradients' own dtype.

The cheap statistics are norms: of every parameter gradient (the global norm), of each gate
block of a recurrent parameter's gradient, and of each (sample, step) row of the gradient at a
recurrent layer's input. Computed one tensor at a time in float64 (a float64 copy of every
gradient, then a norm) they cost more than the rest of the monitor together. Here:

- every parameter's gate blocks are one `vector_norm` over a (G, ·) view of its gradient, in
  the gradient's dtype, all concatenated and moved to the host once (`block_norms`);
- row norms are one `linalg.vector_norm` in the gradient's dtype.

A float32 sum of squares underflows below ~1e-19 per value and overflows above ~1e19, exactly
where vanishing and exploding gradients live. So a norm outside [SAFE_LO, SAFE_HI] (or not
finite) is recomputed in float64 from its tensor: inside that range the float32 result agrees
with the float64 one to a few float32 ulps (tests/test_monitor_fused.py checks both paths give
the same record); outside it the value is the float64 one, as before.

`FUSED = False` switches back to the one-tensor-at-a-time float64 path (the reference the tests
compare against).
"""

from __future__ import annotations

import math

import torch

FUSED = True
# Inside this range a float32 sum of squares neither underflows nor overflows (each value's
# square stays in float32's normal range up to a relative loss far below float32 rounding).
SAFE_LO, SAFE_HI = 1e-10, 1e10


# Inside this range a float64 sum of squares is exact to rounding; outside it squares of large
# values overflow (past ~1e154) or those of small ones underflow (below ~1e-154), and the norm
# is recomputed with each tensor (row) scaled by its largest |value|.
SAFE64_LO, SAFE64_HI = 1e-100, 1e100


def _exact(t: torch.Tensor, dim=None) -> torch.Tensor:
    """float64 norm(s) of t, exact to float64 rounding at any magnitude: nan if a value is nan,
    inf if one is ±inf (and none is nan), 0 for zeros."""
    x = t.detach().to(torch.float64)
    n = torch.linalg.vector_norm(x, dim=dim)
    if x.numel() == 0 or n.numel() == 0:
        return n
    lo, hi = torch.aminmax(n)
    if SAFE64_LO <= float(lo) and float(hi) <= SAFE64_HI:  # the common case; False for nan
        return n
    s = x.abs().amax() if dim is None else x.abs().amax(dim=dim)  # nan propagates, inf next
    ok = torch.isfinite(s) & (s > 0)
    safe = torch.where(ok, s, torch.ones_like(s))
    scaled = torch.linalg.vector_norm(x / (safe if dim is None else safe.unsqueeze(dim)),
                                      dim=dim) * safe
    return torch.where(ok, scaled, s)


def _safe(lo: float, hi: float) -> bool:
    """Whether norms in [lo, hi] from a float32 sum of squares are right (False for NaN)."""
    return SAFE_LO <= lo and hi <= SAFE_HI


def block_norms(grads: list[torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """The 2-norms of each gradient's `blocks[i]` equal row blocks (G gate blocks of a
    (G·H, ·) recurrent weight, 1 for any other tensor), one float64 CPU tensor (Σ blocks,),
    gradient after gradient: a norm outside the float32-safe range (or not finite) is
    recomputed in float64 from its block (`_exact`).

    One `vector_norm` over a (G, ·) view per gradient, one concatenation and one copy to the
    host: per tensor this is cheaper than `_foreach_norm` over per-block views on the CPU
    (measured on a char LM's 11 gradients / 35 blocks: 74-76 µs against 95-195 µs), and no
    Python runs per block.
    """
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    if not FUSED:
        return torch.tensor([float(_exact(v)) for g, k in zip(grads, blocks)
                             for v in param_views(g, k)], dtype=torch.float64)
    with torch.no_grad():  # a gradient from backward(create_graph=True) records nothing here
        norms = torch.cat([torch.linalg.vector_norm(g.reshape(k, -1), dim=1)
                           for g, k in zip(grads, blocks)]).to("cpu", torch.float64)
    values, at = norms.tolist(), 0  # a few dozen numbers: checked in Python, not by tensor ops
    if all(SAFE_LO <= v <= SAFE_HI for v in values):  # the common case (False for nan)
        return norms
    # rare: vanishing / exploding / non-finite blocks, recomputed in float64 (float64
    # gradients only outside the range where their own sum of squares is exact)
    for g, k in zip(grads, blocks):
        views = None
        for j in range(k):
            v = values[at + j]
            if not _safe(v, v) and (g.dtype != torch.float64 or not SAFE64_LO <= v <= SAFE64_HI):
                views = param_views(g, k) if views is None else views
                norms[at + j] = _exact(views[j])
        at += k
    return norms


def norm_of_norms(values) -> float:
    """‖(v_1, …, v_n)‖₂ of float64 norms without overflow (a sum of squares overflows past
    ~1e154) and with NaN kept: math.hypot(inf, nan) is inf, but a NaN gradient must read NaN."""
    values = list(values)
    return math.nan if any(v != v for v in values) else math.hypot(*values)


def row_norms(g: torch.Tensor) -> torch.Tensor:
    """float64 CPU norms over the last dimension of g (e.g. (B, T, I) -> (B, T))."""
    return row_norms_checked(g)[0]


def row_norms_checked(g: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`row_norms(g)` and whether they are known to be finite (True when the fused path found
    every row in its safe range; False means "not known", not "non-finite")."""
    if not FUSED or g.dtype == torch.float64:
        return _exact(g, -1).cpu(), False
    n = torch.linalg.vector_norm(g.detach(), dim=-1)
    lo, hi = torch.stack(torch.aminmax(n)).tolist() if n.numel() else (SAFE_LO, SAFE_LO)
    if not _safe(lo, hi):  # rare: vanishing / exploding / non-finite rows
        return _exact(g, -1).cpu(), False
    return n.to("cpu", torch.float64), True


def param_views(grad: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """A gradient as `blocks` equal row blocks (views when contiguous): (G·H, ·) -> G pieces."""
    if blocks == 1:
        return [grad]
    return list(grad.reshape(blocks, -1).unbind(0))
