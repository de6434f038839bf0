"""The issue's suggested design for a faster replay, taken as lean as I could take it: one
autograd node per LSTM or GRU layer with a closed-form backward, timed beside the replay in
benchmark (c) of bench_core.py. rnnscope does not use it.

Issue 10 asks for the replay's forward+backward within 1.3× of the fused `nn.LSTM` (1.0× for
the GRU) and suggests "a custom autograd.Function per layer with the closed-form backward".
For the LSTM:

- one autograd node per layer (no per-step nodes, no graph bookkeeping);
- every GEMM that does not depend on the recurrence batched over time (the input projection
  forward; ∂L/∂x, ∂W_ih, ∂W_hh and the biases backward);
- gates reordered (o, i, f, g) so that one sigmoid covers the three sigmoid gates;
- per step, 7 operations forward (the recurrent GEMM, σ, tanh, f·c, + i·g, tanh c, o·tanh c)
  and 5 backward (the recurrent GEMM, ∂c, the o block, the i/f/g blocks, ∂c·f), each writing
  into preallocated time-major buffers;
- the backward's per-step coefficients (σ', tanh') from four whole-sequence operations.

The GRU's is built the same way: 6 operations per step forward (one recurrent GEMM for all
three gates, + input part, σ, + r·(W_hn h + b_hn), tanh, lerp) and 4 backward (∂ of the input
parts, ∂ of the recurrent parts, ∂h·z, the recurrent GEMM).

Both expose less than the replay: no per-step tensors to take total state gradients from (the
replay's `steps_h`/`steps_c`, which `state_gradients` and the monitor differentiate), no gates
in the graph. What they would save the replay is therefore an upper bound on what this design
can save it. Correct to float64 rounding against the fused modules (`check`).

Shapes: x (B, T, I), h0 and c0 (B, H), w_ih (G·H, I), w_hh (G·H, H), biases (G·H,) with G = 4
(LSTM, b = b_ih + b_hh) or 3 (GRU); buffers are time-major (T, B, ·).
"""

from __future__ import annotations

import torch
from torch import nn

_sigmoid_backward = torch.ops.aten.sigmoid_backward  # (grad, σ) -> grad · σ(1 − σ)
_tanh_backward = torch.ops.aten.tanh_backward  # (grad, t) -> grad · (1 − t²)


def _order(H: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse): PyTorch's gate rows (i, f, g, o) -> (o, i, f, g) and back."""
    perm = torch.cat([torch.arange(3 * H, 4 * H), torch.arange(0, 2 * H),
                      torch.arange(2 * H, 3 * H)]).to(device)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(4 * H, device=device)
    return perm, inv


class LSTMLayer(torch.autograd.Function):
    """forward(x, h0, c0, w_ih, w_hh, b) -> h (B, T, H), a view of a time-major buffer."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b):
        B, T, _ = x.shape
        H = w_hh.shape[1]
        perm, inv = _order(H, x.device)
        wi, wh = w_ih[perm], w_hh[perm]
        pre = nn.functional.linear(x.transpose(0, 1), wi, b[perm])  # (T, B, 4H): o, i, f, g
        new = x.new_empty
        sig, g, c, tanh_c, h_all = (new(T, B, 3 * H), new(T, B, H), new(T, B, H),
                                    new(T, B, H), new(T, B, H))
        wh_t = wh.t()
        h, c_prev = h0, c0
        for pre_t, s_t, g_t, c_t, tc_t, h_t in zip(pre.unbind(0), sig.unbind(0), g.unbind(0),
                                                   c.unbind(0), tanh_c.unbind(0),
                                                   h_all.unbind(0)):
            torch.addmm(pre_t, h, wh_t, out=pre_t)
            torch.sigmoid(pre_t[:, :3 * H], out=s_t)
            torch.tanh(pre_t[:, 3 * H:], out=g_t)
            torch.mul(s_t[:, 2 * H:], c_prev, out=c_t)
            c_t.addcmul_(s_t[:, H:2 * H], g_t)
            torch.tanh(c_t, out=tc_t)
            h = torch.mul(s_t[:, :H], tc_t, out=h_t)
            c_prev = c_t
        ctx.save_for_backward(x, h0, c0, wi, wh, sig, g, c, tanh_c, h_all, inv)
        return h_all.transpose(0, 1)

    @staticmethod
    def backward(ctx, d_out):
        x, h0, c0, wi, wh, sig, g, c, tanh_c, h_all, inv = ctx.saved_tensors
        T, B, H = c.shape
        o, i, f = sig[..., :H], sig[..., H:2 * H], sig[..., 2 * H:]
        # ∂pre per unit of ∂h (block o) or of ∂c (blocks i, f, g)
        coef = x.new_empty(T, B, 4 * H)
        _sigmoid_backward(tanh_c, o, grad_input=coef[..., :H])
        _sigmoid_backward(g, i, grad_input=coef[..., H:2 * H])
        _sigmoid_backward(c[:-1], f[1:], grad_input=coef[1:, :, 2 * H:3 * H])
        _sigmoid_backward(c0.unsqueeze(0), f[:1], grad_input=coef[:1, :, 2 * H:3 * H])
        _tanh_backward(i, g, grad_input=coef[..., 3 * H:])
        dc_dh = _tanh_backward(o, tanh_c)  # ∂c_t per unit of ∂h_t: o (1 − tanh² c)
        d_pre = x.new_empty(T, B, 4 * H)
        dh_buf, dc_buf = x.new_empty(T, B, H), x.new_empty(T, B, H)
        d_h_out = d_out.transpose(0, 1)  # (T, B, H)
        dc_next = torch.zeros_like(c0)  # ∂L/∂c_{t} through c_{t+1} (f_{t+1} · ∂L/∂c_{t+1})
        later = None
        rows = zip(d_h_out.unbind(0), dh_buf.unbind(0), dc_buf.unbind(0), dc_dh.unbind(0),
                   d_pre.unbind(0), coef.unbind(0), f.unbind(0))
        for dy_t, dh_t, dc_t, k_t, dp_t, co_t, f_t in reversed(list(rows)):
            dh = (dh_t.copy_(dy_t) if later is None
                  else torch.addmm(dy_t, later, wh, out=dh_t))
            dc = torch.addcmul(dc_next, dh, k_t, out=dc_t)
            torch.mul(dh, co_t[:, :H], out=dp_t[:, :H])
            torch.mul(dc.unsqueeze(1), co_t[:, H:].view(B, 3, H),
                      out=dp_t[:, H:].view(B, 3, H))
            dc_next = dc * f_t
            later = dp_t
        flat = d_pre.view(T * B, 4 * H)
        dx = (flat @ wi).view(T, B, -1).transpose(0, 1)
        dw_ih = (flat.t() @ x.transpose(0, 1).reshape(T * B, -1))[inv]
        dw_hh = flat[B:].t() @ h_all[:-1].reshape(-1, H)
        dw_hh.addmm_(flat[:B].t(), h0)
        return dx, d_pre[0] @ wh, dc_next, dw_ih, dw_hh[inv], flat.sum(0)[inv]


class GRULayer(torch.autograd.Function):
    """forward(x, h0, w_ih, w_hh, b_ih, b_hh) -> h (B, T, H), a view of a time-major buffer."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh):
        B, T, _ = x.shape
        H = w_hh.shape[1]
        gx = nn.functional.linear(x.transpose(0, 1), w_ih, b_ih)  # (T, B, 3H): r, z, n
        new = x.new_empty
        gh, rz, n, h_all = new(T, B, 3 * H), new(T, B, 2 * H), new(T, B, H), new(T, B, H)
        wh_t = w_hh.t()
        h = h0
        for gx_t, gh_t, rz_t, n_t, h_t in zip(gx.unbind(0), gh.unbind(0), rz.unbind(0),
                                              n.unbind(0), h_all.unbind(0)):
            torch.addmm(b_hh, h, wh_t, out=gh_t)
            pre_rz = gx_t[:, :2 * H].add_(gh_t[:, :2 * H])
            torch.sigmoid(pre_rz, out=rz_t)
            pre_n = gx_t[:, 2 * H:].addcmul_(rz_t[:, :H], gh_t[:, 2 * H:])
            torch.tanh(pre_n, out=n_t)
            h = torch.lerp(n_t, h, rz_t[:, H:], out=h_t)  # (1 − z)·n + z·h
        ctx.save_for_backward(x, h0, w_ih, w_hh, gh, rz, n, h_all)
        return h_all.transpose(0, 1)

    @staticmethod
    def backward(ctx, d_out):
        x, h0, w_ih, w_hh, gh, rz, n, h_all = ctx.saved_tensors
        T, B, H = n.shape
        r, z = rz[..., :H], rz[..., H:]
        a = _tanh_backward(1 - z, n)  # ∂h' per unit of ∂(pre-activation of n)
        # ∂(input parts) and ∂(recurrent parts) per unit of ∂h': blocks r, z, n
        coef_x, coef_h = x.new_empty(T, B, 3 * H), x.new_empty(T, B, 3 * H)
        _sigmoid_backward(a * gh[..., 2 * H:], r, grad_input=coef_x[..., :H])
        _sigmoid_backward(h_all[:-1] - n[1:], z[1:], grad_input=coef_x[1:, :, H:2 * H])
        _sigmoid_backward(h0.unsqueeze(0) - n[:1], z[:1], grad_input=coef_x[:1, :, H:2 * H])
        coef_x[..., 2 * H:] = a
        coef_h[..., :2 * H] = coef_x[..., :2 * H]
        torch.mul(a, r, out=coef_h[..., 2 * H:])
        d_gx, d_gh = x.new_empty(T, B, 3 * H), x.new_empty(T, B, 3 * H)
        d_h_out = d_out.transpose(0, 1)  # (T, B, H)
        dh = d_h_out[-1]
        rows = list(zip(d_gx.unbind(0), d_gh.unbind(0), coef_x.unbind(0), coef_h.unbind(0),
                        z.unbind(0)))
        for t in range(T - 1, -1, -1):
            dgx_t, dgh_t, cx_t, ch_t, z_t = rows[t]
            torch.mul(dh.unsqueeze(1), cx_t.view(B, 3, H), out=dgx_t.view(B, 3, H))
            torch.mul(dh.unsqueeze(1), ch_t.view(B, 3, H), out=dgh_t.view(B, 3, H))
            below = d_h_out[t - 1] if t > 0 else torch.zeros_like(h0)
            dh = torch.addcmul(below, dh, z_t).addmm_(dgh_t, w_hh)
        fx, fh = d_gx.view(T * B, 3 * H), d_gh.view(T * B, 3 * H)
        dx = (fx @ w_ih).view(T, B, -1).transpose(0, 1)
        dw_ih = fx.t() @ x.transpose(0, 1).reshape(T * B, -1)
        dw_hh = fh[B:].t() @ h_all[:-1].reshape(-1, H)
        dw_hh.addmm_(fh[:B].t(), h0)
        return dx, dh, dw_ih, dw_hh, fx.sum(0), fh.sum(0)


def _check_module(m: nn.Module) -> None:
    if (m.num_layers, m.bidirectional, getattr(m, "proj_size", 0), m.batch_first) != \
            (1, False, 0, True) or not m.bias:
        raise ValueError("the closed-form layer covers a one-layer, one-direction, batch-first "
                         "module with biases and no projection")


def layer_output(m: nn.LSTM | nn.GRU, x: torch.Tensor) -> torch.Tensor:
    """The output of a one-layer, unidirectional, batch-first nn.LSTM (no projection) or
    nn.GRU from zero initial states, through its closed-form layer (gradients reach m's own
    parameters)."""
    _check_module(m)
    z = x.new_zeros(x.shape[0], m.hidden_size)
    if isinstance(m, nn.LSTM):
        return LSTMLayer.apply(x, z, z, m.weight_ih_l0, m.weight_hh_l0,
                                    m.bias_ih_l0 + m.bias_hh_l0)
    if isinstance(m, nn.GRU):
        return GRULayer.apply(x, z, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0,
                                   m.bias_hh_l0)
    raise TypeError(f"the closed-form layer covers nn.LSTM and nn.GRU; got {type(m).__name__}")


def check() -> float:
    """Largest relative difference between the closed-form layers' and the fused modules'
    gradients (input and every parameter) in float64 on random problems; raises above 1e-10."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for kind in (nn.LSTM, nn.GRU):
        m = kind(5, 7, batch_first=True).double()
        with torch.no_grad():
            for p in m.parameters():  # the default init's scale, not its draws
                p.copy_(torch.rand(p.shape, dtype=torch.float64, generator=g) - 0.5)
        x = torch.randn(3, 11, 5, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(3, 11, 7, dtype=torch.float64, generator=g)
        params = list(m.parameters())
        ref = torch.autograd.grad((m(x)[0] * w).sum(), [x] + params)
        got = torch.autograd.grad((layer_output(m, x) * w).sum(), [x] + params)
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))
        if err > 1e-10:
            raise AssertionError(f"the closed-form layer differs from nn.{kind.__name__} by "
                                 f"{err:.2e} relative")
        worst = max(worst, err)
    return worst


if __name__ == "__main__":
    print("closed-form layers vs nn.LSTM and nn.GRU, float64, largest relative difference: "
          f"{check():.1e}")
