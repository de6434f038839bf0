"""Vanilla RNN: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu.

No gates and no highway: the one-step Jacobian is diag(act'(pre_t)) W_hh (Pascanu et al. 2013).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..recurrent import LayerParams
from .layer_trace import LayerTrace, stack_steps, step_masks


def run(p: LayerParams, x: torch.Tensor, h0: torch.Tensor, *, reverse: bool,
        nonlinearity: str = "tanh", lengths: torch.Tensor | None = None) -> LayerTrace:
    """Unroll one layer/direction. x (B, T, I_l), h0 (B, H).

    lengths (B,): each sample's valid length; at positions t ≥ lengths[b] the state is carried
    through unchanged (new = where(valid, step, prev)), as PyTorch's packed-sequence kernel does.
    """
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    gx = torch.nn.functional.linear(x, p.w_ih, p.b_ih)  # (B, T, H)
    if p.b_hh is not None:
        gx = gx + p.b_hh
    steps = gx.unbind(1)  # unbind once: indexing gx[:, t] per step makes backward O(T^2)
    if reverse:
        steps = steps[::-1]
    w_hh_t = p.w_hh.t()
    masks = step_masks(lengths, len(steps), x.device, reverse)
    h = h0
    hs = []
    for gx_t, m in zip(steps, masks):
        h_new = act(torch.addmm(gx_t, h, w_hh_t))
        h = h_new if m is None else torch.where(m, h_new, h)
        hs.append(h)
    return LayerTrace(x=x, h=stack_steps(hs, reverse), h0=h0, c0=None, reverse=reverse,
                      steps_h=tuple(hs), lengths=lengths)


def act_derivative(h: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    """act'(pre) from the output h: 1 - h^2 for tanh, 1[h > 0] for relu (PyTorch's relu'(0) = 0)."""
    if nonlinearity == "tanh":
        return 1 - h * h
    return (h > 0).to(h.dtype)


def step_jacobians(p: LayerParams, tr: LayerTrace, n: slice, *, nonlinearity: str):
    """Exact ∂h_n/∂h_{n-1} for processing steps n in the slice.

    Returns (direct, indirect): direct is None (no highway); indirect (B, S, H, H).
    """
    d = act_derivative(tr.step_range(tr.h, n), nonlinearity)  # (B, S, H)
    return None, d.unsqueeze(-1) * p.w_hh


# ----------------------------------------------------------------------------------------------
# The one-step vector-Jacobian product (the contract every cell module shares: `vjp_weights`,
# `vjp_saved`, `step_vjp`; see cells/__init__.py)


class VJPWeights(NamedTuple):
    """w_hh (H, H), detached; w_in (H, H + I) = [W_hh | W_ih] with inputs=True, else None."""

    w_hh: torch.Tensor
    w_in: torch.Tensor | None = None


class VJPSaved(NamedTuple):
    """d (…, H) = act'(pre_n), broadcast against the cotangent's leading dimensions."""

    d: torch.Tensor


def vjp_weights(p: LayerParams, *, inputs: bool = False) -> VJPWeights:
    """The detached weight `step_vjp` reads; inputs=True also joins W_ih for `into=`."""
    w_hh = p.w_hh.detach()
    return VJPWeights(w_hh, torch.cat([w_hh, p.w_ih.detach()], dim=1) if inputs else None)


def vjp_saved(h: torch.Tensor, nonlinearity: str) -> VJPSaved:
    """`VJPSaved` for any number of steps at once from the states the steps made, h (…, H)."""
    return VJPSaved(act_derivative(h, nonlinearity))


def vjp_saved_from_trace(p: LayerParams, tr: LayerTrace, *, nonlinearity: str = "tanh"):
    """`VJPSaved` of every step of a replayed layer/direction, (B, T, H) in processing order,
    detached: act' read from the states the steps made."""
    return vjp_saved(tr.in_steps(tr.h).detach(), nonlinearity)


def vjp_saved_from_states(p: LayerParams, x: torch.Tensor, h_prev: torch.Tensor,
                          h: torch.Tensor, c0=None, *, nonlinearity: str = "tanh"):
    """`VJPSaved` of every step at once, (T, B, H), from the states the steps made h
    (T, B, H) (x, h_prev, c0: unused here)."""
    return vjp_saved(h, nonlinearity)


def step_vjp(w: VJPWeights, s: VJPSaved, d_state: tuple, *, fold: bool = False,
             dc_total=None, into: torch.Tensor | None = None):
    """One step's VJP: from the cotangent of h_n to those of h_{n−1} and of the input
    projection gx_n = W_ih x_n + b_ih.

    Args:
        w: `vjp_weights(p)`.
        s: the step's `VJPSaved`, broadcastable against the cotangent.
        d_state: (dh (…, H),).
        fold, dc_total: accepted so that every cell's step_vjp takes the same arguments; there
            is nothing to fold (the VJP is one shared GEMM either way) and no cell state.

    Returns:
        ((dh_{n−1} (…, H),), d_in (…, H) = ∂/∂gx_n = dh act'(pre_n)). The input gradient is
        d_in W_ih.
    """
    (dh,) = d_state
    d_in = dh * s.d
    H = dh.shape[-1]
    if into is not None:
        into.view(-1, into.shape[-1]).addmm_(d_in.view(-1, H), w.w_in)
        return (into[..., :H],), d_in
    return ((d_in.view(-1, H) @ w.w_hh).view(dh.shape),), d_in
