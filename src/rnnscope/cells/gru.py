"""GRU, PyTorch's equations (gate order r, z, n; z is the retain gate):

    r = σ(W_ir x + b_ir + W_hr h + b_hr)
    z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 − z) ⊙ n + z ⊙ h

The highway is the z ⊙ h term: ∂h'/∂h = diag(z) + indirect paths through r, z and n.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..recurrent import LayerParams
from .layer_trace import LayerTrace, stack_steps, step_masks
from .lstm import _fold


def run(p: LayerParams, x: torch.Tensor, h0: torch.Tensor, *, reverse: bool,
        nonlinearity: str = "tanh", lengths: torch.Tensor | None = None) -> LayerTrace:
    """Unroll one layer/direction. x (B, T, I_l), h0 (B, H).

    lengths (B,): each sample's valid length; at positions t ≥ lengths[b] the state is carried
    through unchanged (the gates there are computed but not valid).
    """
    H = p.w_hh.shape[1]
    gx = torch.nn.functional.linear(x, p.w_ih, p.b_ih)  # (B, T, 3H)
    gx_rz, gx_n = gx.split((2 * H, H), dim=-1)
    if p.b_hh is not None:
        gx_rz = gx_rz + p.b_hh[: 2 * H]  # b_hr, b_hz add outside the reset product
        b_hn = p.b_hh[2 * H:]
    steps = list(zip(gx_rz.unbind(1), gx_n.unbind(1)))
    if reverse:
        steps = steps[::-1]
    w_rz_t, w_n_t = p.w_hh[: 2 * H].t(), p.w_hh[2 * H:].t()
    masks = step_masks(lengths, len(steps), x.device, reverse)
    h = h0
    hs, rzs, ns = [], [], []
    for (gx_rz_t, gx_n_t), m in zip(steps, masks):
        rz = torch.sigmoid(torch.addmm(gx_rz_t, h, w_rz_t))
        r, z = rz.chunk(2, dim=1)
        gh_n = torch.addmm(b_hn, h, w_n_t) if p.b_hh is not None else h @ w_n_t
        n = torch.tanh(torch.addcmul(gx_n_t, r, gh_n))
        h_new = torch.lerp(n, h, z)  # (1 − z)·n + z·h
        h = h_new if m is None else torch.where(m, h_new, h)
        hs.append(h)
        rzs.append(rz)
        ns.append(n)
    def gates():
        rz_all = stack_steps(rzs, reverse)
        return {"r": rz_all[..., :H], "z": rz_all[..., H:], "n": stack_steps(ns, reverse)}

    return LayerTrace(x=x, h=stack_steps(hs, reverse), h0=h0, c0=None, reverse=reverse,
                      steps_h=tuple(hs), gate_builder=gates, lengths=lengths)


def step_jacobians(p: LayerParams, tr: LayerTrace, n: slice, *, nonlinearity: str = "tanh"):
    """Exact ∂h_n/∂h_{n-1} for processing steps n in the slice.

    Returns (direct (B, S, H) = z_n, indirect (B, S, H, H)).
    """
    H = p.w_hh.shape[1]
    r, z, nn_ = (tr.step_range(tr.gates[k], n) for k in ("r", "z", "n"))
    h_prev = tr.prev_h[:, n]
    w_r, w_z, w_n = p.w_hh.view(3, H, H).unbind(0)
    gh_n = h_prev @ w_n.t()
    if p.b_hh is not None:
        gh_n = gh_n + p.b_hh[2 * H:]
    dn = (1 - z) * (1 - nn_ * nn_)  # ∂h'/∂(pre-activation of n)
    alpha_r = dn * gh_n * r * (1 - r)
    alpha_z = (h_prev - nn_) * z * (1 - z)
    alpha_n = dn * r
    indirect = (alpha_r.unsqueeze(-1) * w_r + alpha_z.unsqueeze(-1) * w_z
                + alpha_n.unsqueeze(-1) * w_n)
    return z, indirect


# ----------------------------------------------------------------------------------------------
# The one-step vector-Jacobian product (the contract every cell module shares: `vjp_weights`,
# `vjp_saved`, `step_vjp`; see cells/__init__.py)


class VJPWeights(NamedTuple):
    """One layer/direction's weights as the step VJP reads them (detached, made once).

    w_nrz (3H, H): W_hh with its row blocks reordered (n, r, z), so that the cotangents of
    (W_hn h + b_hn, pre_r, pre_z), held next to each other, meet it in one GEMM; w (3, H, H)
    the same blocks as a stack; w_ih (3H, I) with inputs=True (for `step_vjp(..., into=)`),
    else None.
    """

    w_nrz: torch.Tensor
    w: torch.Tensor
    w_ih: torch.Tensor | None = None


class VJPSaved(NamedTuple):
    """What one GRU step's VJP reads, besides the weights; broadcast against the cotangents'
    leading dimensions.

    coef (…, 4, H) = ∂h_n/∂(W_hn h_{n−1} + b_hn, pre_r, pre_z, pre_n) =
    (a r, a ghn r (1 − r), (h_{n−1} − n) z (1 − z), a), a = (1 − z)(1 − n²),
    ghn = W_hn h_{n−1} + b_hn; z (…, H) the retain gate.
    """

    coef: torch.Tensor
    z: torch.Tensor


def vjp_weights(p: LayerParams, *, inputs: bool = False) -> VJPWeights:
    """The detached weights `step_vjp` reads (make them once per layer/direction)."""
    w_hh = p.w_hh.detach()
    H = w_hh.shape[1]
    w_nrz = torch.cat([w_hh[2 * H:], w_hh[: 2 * H]])
    return VJPWeights(w_nrz, w_nrz.view(3, H, H), p.w_ih.detach() if inputs else None)


def vjp_saved(r, z, n, h_prev, ghn) -> VJPSaved:
    """`VJPSaved` for any number of steps at once from the gates r, z, n, the state entering
    the step h_prev and ghn = W_hn h_prev + b_hn, all the same shape (…, H)."""
    a = (1 - z) * (1 - n * n)
    coef = torch.stack([a * r, a * ghn * r * (1 - r), (h_prev - n) * z * (1 - z), a], dim=-2)
    return VJPSaved(coef, z)


def vjp_saved_from_trace(p: LayerParams, tr: LayerTrace, *, nonlinearity: str = "tanh"):
    """`VJPSaved` of every step of a replayed layer/direction, (B, T, …) in processing order,
    detached (nonlinearity: unused, taken by every cell's version)."""
    r, z, n = (tr.in_steps(tr.gates[k]).detach() for k in ("r", "z", "n"))
    h_prev = tr.prev_h.detach()
    H = h_prev.shape[-1]
    ghn = torch.nn.functional.linear(h_prev, p.w_hh.detach()[2 * H:],
                                     None if p.b_hh is None else p.b_hh.detach()[2 * H:])
    return vjp_saved(r, z, n, h_prev, ghn)


def vjp_saved_from_states(p: LayerParams, x: torch.Tensor, h_prev: torch.Tensor,
                          h: torch.Tensor, c0=None, *, nonlinearity: str = "tanh"):
    """`VJPSaved` of every step at once, (T, B, …), from a layer's time-major input x
    (T, B, I) and the states entering its steps h_prev (T, B, H) (h, c0: unused here): the
    gates need no loop over time."""
    T, B = x.shape[:2]
    H = p.w_hh.shape[1]
    h2 = h_prev.reshape(T * B, H)
    gx = torch.nn.functional.linear(x.reshape(T * B, -1), p.w_ih.detach(),
                                    None if p.b_ih is None else p.b_ih.detach())
    gh = torch.nn.functional.linear(h2, p.w_hh.detach(),
                                    None if p.b_hh is None else p.b_hh.detach())  # (T·B, 3H)
    rz = torch.sigmoid(gx[:, :2 * H] + gh[:, :2 * H])
    r, z = rz[:, :H], rz[:, H:]
    ghn = gh[:, 2 * H:]
    n = torch.tanh(torch.addcmul(gx[:, 2 * H:], r, ghn))
    view = lambda t: t.reshape(T, B, H)  # noqa: E731
    return vjp_saved(view(r), view(z), view(n), view(h2), view(ghn))


def step_vjp(w: VJPWeights, s: VJPSaved, d_state: tuple, *, fold: bool = False,
             dc_total=None, into: torch.Tensor | None = None):
    """One step's VJP: from the cotangent of h_n to those of h_{n−1} and of the input
    projection gx_n = W_ih x_n + b_ih.

    Args:
        w: `vjp_weights(p)`.
        s: the step's `VJPSaved`, broadcastable against the cotangent ((B, H) against stacked
            rows (R, B, H); (B, 1, H) against per-sample rows (B, N, H)).
        d_state: (dh (…, H),).
        fold: d_state holds N rows per sample, (B, N, H), and s is (B, 1, ·): fold the three
            blocks into the per-sample indirect Jacobian M_n = Σ diag(coef) W (B, H, H) (3·H² to
            build, then N·H² multiply-adds per sample instead of 3·N·H²). d_in is then not
            formed.
        dc_total: unused (the GRU has no cell state); accepted so that every cell's step_vjp
            takes the same arguments.
        into: if given (needs `vjp_weights(p, inputs=True)`), a contiguous (…, H + I) tensor
            the step adds (∂/∂h_{n−1} | ∂/∂x_n) into; dh_{n−1} is then its first H columns.

    Returns:
        ((dh_{n−1} (…, H),), d_in (…, 3H) = ∂/∂gx_n in PyTorch's block order (r, z, n), or None
        with fold). The input gradient is d_in W_ih.
    """
    (dh,) = d_state
    if fold:
        m = _fold(s.coef.squeeze(1), w.w)  # M_n (B, H, H), the indirect Jacobian
        return (torch.baddbmm(dh * s.z, dh, m),), None
    lead = dh.shape[:-1]
    H = dh.shape[-1]
    u = torch.mul(dh.unsqueeze(-2), s.coef).view(*lead, 4 * H)  # (ghn, r, z, n) cotangents
    if into is not None:
        flat = into.view(-1, into.shape[-1])
        flat[:, :H].addmm_(u[..., : 3 * H].reshape(-1, 3 * H), w.w_nrz)
        flat[:, H:].addmm_(u[..., H:].reshape(-1, 3 * H), w.w_ih)
        dh_prev = into[..., :H]
        dh_prev.addcmul_(dh, s.z)
        return (dh_prev,), u[..., H:]
    dh_prev = torch.addcmul((u[..., : 3 * H].reshape(-1, 3 * H) @ w.w_nrz).view(*lead, H),
                            dh, s.z)
    return (dh_prev,), u[..., H:]
