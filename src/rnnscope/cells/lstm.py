"""LSTM, PyTorch's equations (gate order i, f, g, o; optional projection W_hr):

    i, f, o = σ(W_i* x + b_i* + W_h* h + b_h*),   g = tanh(W_ig x + b_ig + W_hg h + b_hg)
    c' = f ⊙ c + i ⊙ g
    h' = o ⊙ tanh(c')            (h' = W_hr (o ⊙ tanh(c')) with proj_size > 0)

The highway: ∂c'/∂c = diag(f) when h is held fixed. Exact one-step Jacobians, with
K = ∂c'/∂h = diag(c f(1−f)) W_hf + diag(g i(1−i)) W_hi + diag(i (1−g²)) W_hg   (H × P) and
E = ∂h/∂c = [W_hr] diag(o (1−tanh²c))                                          (P × H):

    state "c" (h_{n-1} = o_{n-1} tanh(c_{n-1}) moves with c_{n-1}), one step:
        ∂c_n/∂c_{n-1} = diag(f_n) + K_n E_{n-1}
    (over several steps c alone is not Markov — o_n depends on h_{n-1} — so spans are taken
    through the full state: ∂c_m/∂c_n = [0 I] F_m ⋯ F_{n+1} [E_n; I])
    full state s = (h, c):
        ∂c_n/∂h_{n-1} = K_n,   ∂c_n/∂c_{n-1} = diag(f_n)
        ∂h_n/∂h_{n-1} = [W_hr] diag(tanh(c_n) o_n(1−o_n)) W_ho + E_n K_n,
        ∂h_n/∂c_{n-1} = E_n diag(f_n)
"""

from __future__ import annotations

import torch

from ..recurrent import LayerParams
from .layer_trace import LayerTrace, stack_steps, step_masks


def run(p: LayerParams, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, *,
        reverse: bool, lengths: torch.Tensor | None = None) -> LayerTrace:
    """Unroll one layer/direction. x (B, T, I_l), h0 (B, H_out), c0 (B, H).

    lengths (B,): each sample's valid length; at positions t ≥ lengths[b] h and c are carried
    through unchanged (the gates there are computed but not valid).
    """
    H = p.w_hh.shape[0] // 4
    gx = torch.nn.functional.linear(x, p.w_ih, p.b_ih)  # (B, T, 4H)
    if p.b_hh is not None:
        gx = gx + p.b_hh
    steps = gx.unbind(1)  # unbind once: indexing gx[:, t] per step makes backward O(T^2)
    if reverse:
        steps = steps[::-1]
    w_hh_t = p.w_hh.t()
    w_hr_t = p.w_hr.t() if p.w_hr is not None else None
    masks = step_masks(lengths, len(steps), x.device, reverse)
    h, c = h0, c0
    hs, cs, sigs, gs = [], [], [], []
    for gx_t, m in zip(steps, masks):
        pre = torch.addmm(gx_t, h, w_hh_t)  # (B, 4H)
        sig = torch.sigmoid(pre)  # i, f, o blocks are used; the g block is discarded
        i, f, _, o = sig.chunk(4, dim=1)
        g = torch.tanh(pre[:, 2 * H: 3 * H])
        c_new = torch.addcmul(f * c, i, g)
        h_new = o * torch.tanh(c_new)
        if w_hr_t is not None:
            h_new = h_new @ w_hr_t
        if m is None:
            h, c = h_new, c_new
        else:
            h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
        hs.append(h)
        cs.append(c)
        sigs.append(sig)
        gs.append(g)
    def gates():
        sig_all = stack_steps(sigs, reverse)
        return {"i": sig_all[..., :H], "f": sig_all[..., H:2 * H], "g": stack_steps(gs, reverse),
                "o": sig_all[..., 3 * H:]}

    return LayerTrace(x=x, h=stack_steps(hs, reverse), h0=h0, c0=c0, reverse=reverse,
                      steps_h=tuple(hs), steps_c=tuple(cs), gate_builder=gates,
                      lengths=lengths)


def _k_matrix(p: LayerParams, i, f, g, c_prev) -> torch.Tensor:
    """K = ∂c_n/∂h_{n-1}: (B, S, H, P) from gate values (B, S, H)."""
    H = p.w_hh.shape[0] // 4
    w_i, w_f, w_g, _ = p.w_hh.view(4, H, -1).unbind(0)
    return ((g * i * (1 - i)).unsqueeze(-1) * w_i + (c_prev * f * (1 - f)).unsqueeze(-1) * w_f
            + (i * (1 - g * g)).unsqueeze(-1) * w_g)


def _e_scale(o, c) -> torch.Tensor:
    """The diagonal of ∂(o ⊙ tanh c)/∂c: (B, S, H)."""
    tc = torch.tanh(c)
    return o * (1 - tc * tc)


def output_jacobian(p: LayerParams, tr: LayerTrace, n: slice) -> torch.Tensor:
    """E_n = ∂h_n/∂c_n = [W_hr] diag(o_n (1 − tanh² c_n)) for steps in the slice: (B, S, P, H)."""
    e = _e_scale(tr.in_steps(tr.gates["o"])[:, n], tr.in_steps(tr.c)[:, n])
    if p.w_hr is None:
        return torch.diag_embed(e)
    return p.w_hr * e.unsqueeze(-2)


def step_jacobians(p: LayerParams, tr: LayerTrace, n: slice) -> torch.Tensor:
    """Exact full-state one-step Jacobians F_n = ∂(h_n, c_n)/∂(h_{n−1}, c_{n−1}) for processing
    steps n in the slice: (B, S, P+H, P+H), rows and columns ordered (h, c).

    The reduced views follow from F: ∂c_n/∂c_{n−1} = [0 I] F_n [E_{n−1}; I] = diag(f_n) +
    K_n E_{n−1} (with E_{−1} = 0: the initial h0 is an input, not a function of c0).
    """
    i, f, g, o = (tr.in_steps(tr.gates[k])[:, n] for k in ("i", "f", "g", "o"))
    c_prev = tr.prev_c[:, n]
    k = _k_matrix(p, i, f, g, c_prev)  # (B, S, H, P)
    H = p.w_hh.shape[0] // 4
    c_now = tr.in_steps(tr.c)[:, n]
    e = _e_scale(o, c_now)  # (B, S, H)
    w_o = p.w_hh.view(4, H, -1)[3]  # (H, P)
    m_o = (torch.tanh(c_now) * o * (1 - o)).unsqueeze(-1) * w_o  # diag(tanh(c) o') W_ho
    dh_dh = m_o + e.unsqueeze(-1) * k  # + diag(e) K
    dh_dc = torch.diag_embed(e * f)
    if p.w_hr is not None:
        dh_dh = p.w_hr @ dh_dh
        dh_dc = p.w_hr @ dh_dc
    top = torch.cat([dh_dh, dh_dc], dim=-1)
    bottom = torch.cat([k, torch.diag_embed(f)], dim=-1)
    return torch.cat([top, bottom], dim=-2)
