"""GRU, PyTorch's equations (gate order r, z, n; z is the retain gate):

    r = σ(W_ir x + b_ir + W_hr h + b_hr)
    z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 − z) ⊙ n + z ⊙ h

The highway is the z ⊙ h term: ∂h'/∂h = diag(z) + indirect paths through r, z and n.
"""

from __future__ import annotations

import torch

from ..recurrent import LayerParams
from .layer_trace import LayerTrace, stack_steps, step_masks


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
