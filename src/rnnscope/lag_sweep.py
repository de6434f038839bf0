"""lag_profile's fast path: one adjoint sweep through a fused recurrent module for all positions.

When the gradient is measured at the input of a fused, unidirectional nn.LSTM / nn.GRU / nn.RNN
(the model itself, or a submodule), ‖∂ℓ_t/∂x_s‖ for P loss positions t splits exactly into

1. the head: cotangents ∂ℓ_t/∂(output, h_n, c_n) of the module's returned tensors, for all
   positions at once with one batched vector-Jacobian product through whatever the model does
   after the recurrence (`torch.autograd.grad(..., is_grads_batched=True)`) — exact for any head;
2. the recurrence: one backward sweep over time with the closed-form one-step adjoint of the
   cell (PyTorch's equations, on the states and gates of `replay`), no autograd graph, with all
   positions' adjoints stacked as R = P·B rows.

The adjoint is linear, so a position whose cotangents are zero after step t_p has a zero adjoint
there: the sweep starts each position at its own last nonzero step (read from the cotangents, so
a head that mixes time forward or backward stays exact) and grows the active rows as it goes
back. Rows are ordered by start step, latest first, so the active rows at each step are a
prefix and every per-step operation works on one contiguous slice. The gradient at the layer's
input, dx_s = dgates_s W_ih, comes out of the same GEMM as the recurrent one
(dgates_s [W_hh | W_ih]); a multi-layer module is swept top layer first, each layer's input
gradient being the next one down's output cotangent.

Everything else (bidirectional modules, packed sequences, cells, training-mode inter-layer
dropout, custom modules, a loss reaching the measured input around the recurrent module) takes
lag_profile's general path; `plan` says why.

Shape legend: P loss positions, B batch, R = P·B adjoint rows (row j·B + b: the j-th position
in sweep order, sample b), T steps, I_l the layer's input features, H hidden units, Ho the
layer's output size (the projection size with proj_size > 0, else H), L layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .recurrent import describe
from .replay import replay

METHOD = "adjoint sweep"  # how lag_profile's config names this path


# ----------------------------------------------------------------------------------------------
# Which forwards qualify


@contextlib.contextmanager
def raw_outputs(model: nn.Module):
    """Record what every fused recurrent submodule returns *before* any user hook can replace it
    (a prepended forward hook): module -> list of returned tensors, with their versions.
    Hooks are removed on exit, also after an error."""
    seen: dict = {}
    handles = []

    def hook(mod, args, out):
        tensors = _returned_tensors(out)
        seen.setdefault(mod, []).append([(t, t._version) for t in tensors])

    try:
        for m in model.modules():
            if isinstance(m, nn.RNNBase):
                handles.append(m.register_forward_hook(hook, prepend=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


def _returned_tensors(out) -> list:
    """(output, h_n) or (output, (h_n, c_n)) -> [output, h_n(, c_n)]; [] if not that shape."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        return []
    state = out[1]
    states = list(state) if isinstance(state, (tuple, list)) else [state]
    if not all(isinstance(t, torch.Tensor) for t in states):
        return []
    return [out[0]] + states


@dataclass
class SweepSite:
    """A measuring site the sweep can serve: the input x of one call of a fused module."""

    module: nn.RNNBase
    x: torch.Tensor       # what the module received, its own layout (B, T, I) or (T, B, I)
    hx: object            # the state it was given (None, h0 or (h0, c0))
    outputs: list         # [output, h_n(, c_n)] as the model's head received them


def plan(fwd, losses: torch.Tensor, raw: dict) -> tuple[SweepSite | None, str]:
    """The sweep site for this forward, or None and the reason the general path is taken."""
    if len(fwd.tensors) != 1:
        return None, "the site is called several times"
    site = fwd.tensors[0]
    found = [(name, calls[0]) for name, calls in fwd.capture.recurrent.items()
             if len(calls) == 1 and calls[0].x is site]
    if len(found) != 1:
        return None, "the site is not the input of one recurrent module call"
    name, call = found[0]
    module = fwd.capture.modules[name]
    if not isinstance(module, nn.RNNBase):
        return None, "the site's recurrent module is a cell"
    try:
        spec = describe(module)
    except (TypeError, ValueError):
        return None, "the recurrent module is not one rnnscope can replay"
    if spec.num_directions != 1:
        return None, "bidirectional"
    if site.dim() != 3:
        return None, "unbatched input"
    if module.training and spec.dropout > 0 and spec.num_layers > 1:
        return None, "inter-layer dropout in training mode"
    outs = _returned_tensors(call.out)
    rec = raw.get(module, [])
    if len(rec) != 1 or len(rec[0]) != len(outs) or not outs or any(
            t is not r or t._version != v for t, (r, v) in zip(outs, rec[0])):
        return None, "the module's outputs were replaced or changed in place after it returned"
    if losses.grad_fn is None:
        return None, "the losses are not differentiable"
    stops = {t.grad_fn for t in outs if t.grad_fn is not None}
    if _reaches(losses.grad_fn, site, stops):
        return None, "the loss reaches the site also around the recurrent module"
    for h in _state_tensors(call.hx):
        if h.grad_fn is not None and _reaches(h.grad_fn, site, set()):
            return None, "the initial state given to the module depends on the site"
    return SweepSite(module, site, call.hx, outs), ""


def _state_tensors(hx) -> list:
    if isinstance(hx, torch.Tensor):
        return [hx]
    if isinstance(hx, (tuple, list)):
        return [t for t in hx if isinstance(t, torch.Tensor)]
    return []


def _reaches(root, leaf: torch.Tensor, stops: set) -> bool:
    """True when the autograd graph from `root` reaches the leaf tensor `leaf` without passing
    through a node in `stops` (the recurrent module's returned tensors)."""
    todo, seen = [root], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is leaf:
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


# ----------------------------------------------------------------------------------------------
# The sweep


def lag_norms(site: SweepSite, losses: torch.Tensor, onehot: torch.Tensor,
              head_vjps) -> tuple[torch.Tensor, str]:
    """(B, P, T) float64 norms ‖∂ℓ_{t_p}/∂x_s‖ and the method's name.

    onehot (P, B, T) selects each position's losses (as in the general path); head_vjps is
    lag_profile's batched-VJP helper, returning per-position gradients (P, ...) of the losses
    with respect to the module's returned tensors.
    """
    spec = describe(site.module)
    grads, head_method = head_vjps(losses, site.outputs, onehot)
    g_out, g_state = grads[0], grads[1:]  # (P, *output.shape), (P, L, B, ·) each
    x = site.x
    P = onehot.shape[0]
    B, T = (x.shape[0], x.shape[1]) if spec.batch_first else (x.shape[1], x.shape[0])
    with torch.no_grad():
        g_out = g_out if spec.batch_first else g_out.transpose(1, 2)  # (P, B, T, Ho)
        starts = _starts(g_out, g_state)  # (P,) last step each position's adjoint starts at
        order = torch.argsort(starts, descending=True, stable=True)
        starts_sorted = starts[order].tolist()
        # rows active at step s: the positions whose start is ≥ s, a prefix in sweep order
        active = [B * sum(1 for st in starts_sorted if st >= s) for s in range(T)]
        trace = replay(site.module, x.detach(), _detached(site.hx))
        idx = order.to(g_out.device)
        # top layer's output cotangent, time-major rows in sweep order: (T, R, Ho)
        cot = g_out.index_select(0, idx).permute(2, 0, 1, 3).reshape(T, P * B, -1)
        state_cots = [g.index_select(0, idx) for g in g_state]  # (P, L, B, ·) each
        for layer in reversed(range(spec.num_layers)):
            h_cot, c_cot = [_layer_rows(g, layer) for g in (state_cots + [None, None])[:2]]
            cot = _sweep_layer(spec, layer, trace.layers[layer][0], cot, h_cot, c_cot, active)
        # cot is now ∂ℓ/∂x in rows: (T, R, I) -> per-sample norms (B, P, T), positions unsorted
        norms = cot.to(torch.float64).norm(dim=-1).view(T, P, B)
        norms = norms.index_select(1, torch.argsort(idx)).permute(2, 1, 0)
    return norms.cpu(), f"{METHOD} ({spec.kind}, head: {head_method})"


def _detached(hx):
    if isinstance(hx, torch.Tensor):
        return hx.detach()
    if isinstance(hx, (tuple, list)):
        return type(hx)(t.detach() if isinstance(t, torch.Tensor) else t for t in hx)
    return hx


def _starts(g_out: torch.Tensor, g_state: list) -> torch.Tensor:
    """(P,) for each position the last step with a nonzero cotangent (T − 1 when the final
    state is used; −1 when nothing is). NaN counts as nonzero, so it propagates as autograd's."""
    P, B, T = g_out.shape[:3]
    nonzero = (g_out != 0).reshape(P, B, T, -1).any(-1).any(1)  # (P, T)
    steps = torch.arange(T, device=g_out.device)
    starts = torch.where(nonzero, steps, -1).amax(1)
    for g in g_state:
        if g is not None:
            used = (g != 0).reshape(P, -1).any(1)
            starts = torch.where(used, T - 1, starts)
    return starts.cpu()


def _layer_rows(g, layer: int):
    """Rows (R, ·) of a final-state cotangent (P, L, B, ·) for one layer, or None."""
    if g is None:
        return None
    return g[:, layer].reshape(-1, g.shape[-1])


def _sweep_layer(spec, layer: int, lt, cot: torch.Tensor, h_cot, c_cot,
                 active: list) -> torch.Tensor:
    """One layer's backward sweep: output cotangents (T, R, Ho) -> input gradients (T, R, I_l).

    Z[s] holds (∂ℓ/∂h_{s−1} | ∂ℓ/∂x_s) for every row: the step-s GEMM dgates_s [W_hh | W_ih]
    writes both at once, adding the recurrent part to the output cotangent already there.
    """
    p = spec.params(layer, 0)
    T, R, Ho = cot.shape
    I = p.w_ih.shape[1]
    Z = cot.new_zeros(T + 1, R, Ho + I)
    Z[1:, :, :Ho] = cot
    if h_cot is not None:
        Z[T, :, :Ho] += h_cot
    kind = spec.kind
    if kind == "lstm":
        _lstm_sweep(p, lt, Z, c_cot, active)
    elif kind == "gru":
        _gru_sweep(p, lt, Z, active)
    else:
        _rnn_sweep(p, lt, Z, active, spec.nonlinearity)
    return Z[:T, :, Ho:]


def _time_major(t: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> contiguous (T, B, ...), so that each step is one contiguous slice."""
    return t.transpose(0, 1).contiguous()


def _lstm_sweep(p, lt, Z, c_cot, active):
    """LSTM adjoint, per step s (dm = dh, or dh W_hr with a projection):
        dc_s = dc_{s+1} f_{s+1} + dm o_s (1 − tanh² c_s)
        d(i, f, g) = dc_s (g i(1−i), c_{s−1} f(1−f), i(1−g²)),   do = dm tanh(c_s) o(1−o)
        (dh_{s−1} | dx_s) += d(i, f, g, o) [W_hh | W_ih]
    """
    T, R = Z.shape[0] - 1, Z.shape[1]
    Ho = p.w_hh.shape[1]
    H = p.w_hh.shape[0] // 4
    B = lt.h.shape[0]
    gates = lt.gates
    i, f, g, o = gates["i"], gates["f"], gates["g"], gates["o"]
    tanh_c = torch.tanh(lt.c)
    e_o = _time_major(o * (1 - tanh_c * tanh_c)).unbind(0)  # (B, H) per step
    k_c = _time_major(torch.stack([g * i * (1 - i), lt.prev_c * f * (1 - f), i * (1 - g * g)],
                                  dim=2)).unbind(0)  # (B, 3, H) per step
    k_o = _time_major(tanh_c * o * (1 - o)).unbind(0)
    f_t = _time_major(f).unbind(0)
    w = torch.cat([p.w_hh, p.w_ih], dim=1).detach()  # (4H, Ho + I)
    w_hr = p.w_hr.detach() if p.w_hr is not None else None
    dc = Z.new_zeros(R, H)
    if c_cot is not None:
        dc += c_cot
    dgates = Z.new_empty(R, 4 * H)
    zs = Z.unbind(0)
    for s in range(T - 1, -1, -1):
        k = active[s]
        if k == 0:
            continue
        q = k // B
        dh = zs[s + 1][:k, :Ho]
        dm = (dh if w_hr is None else torch.mm(dh, w_hr)).view(q, B, H)
        dc_s = dc[:k].view(q, B, H)
        dc_s.addcmul_(dm, e_o[s])
        dg = dgates[:k].view(q, B, 4, H)
        torch.mul(dc_s.unsqueeze(2), k_c[s], out=dg[:, :, :3])
        torch.mul(dm, k_o[s], out=dg[:, :, 3])
        dc_s.mul_(f_t[s])  # carried to step s − 1
        zs[s][:k].addmm_(dgates[:k], w)


def _gru_sweep(p, lt, Z, active):
    """GRU adjoint, per step s, with a = (1 − z)(1 − n²) and ghn = W_hn h_{s−1} + b_hn:
        d pre_n = dh a,   d pre_r = dh a ghn r(1−r),   d pre_z = dh (h_{s−1} − n) z(1−z)
        dx_s = (d pre_r, d pre_z, d pre_n) W_ih
        dh_{s−1} = dh z + (d pre_r, d pre_z, d pre_n r) W_hh
    both from one GEMM of u = (d pre_r, d pre_z, d pre_n, d pre_n r) with a (4H, H + I) block
    matrix.
    """
    T, R = Z.shape[0] - 1, Z.shape[1]
    H = p.w_hh.shape[1]
    I = p.w_ih.shape[1]
    B = lt.h.shape[0]
    r, z, n = lt.gates["r"], lt.gates["z"], lt.gates["n"]
    h_prev = lt.prev_h
    w_hh, w_ih = p.w_hh.detach(), p.w_ih.detach()
    ghn = h_prev @ w_hh[2 * H:].t()
    if p.b_hh is not None:
        ghn = ghn + p.b_hh[2 * H:].detach()
    a = (1 - z) * (1 - n * n)
    coef = _time_major(torch.stack([a * ghn * r * (1 - r), (h_prev - n) * z * (1 - z), a, a * r],
                                   dim=2)).unbind(0)  # (B, 4, H) per step
    z_t = _time_major(z).unbind(0)
    m = w_hh.new_zeros(4 * H, H + I)
    m[: 2 * H, :H] = w_hh[: 2 * H]
    m[: 2 * H, H:] = w_ih[: 2 * H]
    m[2 * H: 3 * H, H:] = w_ih[2 * H:]
    m[3 * H:, :H] = w_hh[2 * H:]
    u = Z.new_empty(R, 4 * H)
    zs = Z.unbind(0)
    for s in range(T - 1, -1, -1):
        k = active[s]
        if k == 0:
            continue
        q = k // B
        dh = zs[s + 1][:k, :H].view(q, B, H)
        torch.mul(dh.unsqueeze(2), coef[s], out=u[:k].view(q, B, 4, H))
        out = zs[s][:k]
        out.addmm_(u[:k], m)
        out[:, :H].view(q, B, H).addcmul_(dh, z_t[s])


def _rnn_sweep(p, lt, Z, active, nonlinearity: str):
    """Vanilla RNN adjoint: d pre_s = dh act'(pre_s); (dh_{s−1} | dx_s) += d pre_s [W_hh | W_ih].
    act' is read from the output: 1 − h² for tanh, 1[h > 0] for relu (PyTorch's relu'(0) = 0)."""
    T, R = Z.shape[0] - 1, Z.shape[1]
    H = p.w_hh.shape[1]
    B = lt.h.shape[0]
    h = lt.h
    d = (1 - h * h) if nonlinearity == "tanh" else (h > 0).to(h.dtype)
    d_t = _time_major(d).unbind(0)
    w = torch.cat([p.w_hh, p.w_ih], dim=1).detach()  # (H, H + I)
    dpre = Z.new_empty(R, H)
    zs = Z.unbind(0)
    for s in range(T - 1, -1, -1):
        k = active[s]
        if k == 0:
            continue
        q = k // B
        dh = zs[s + 1][:k, :H].view(q, B, H)
        torch.mul(dh, d_t[s], out=dpre[:k].view(q, B, H))
        zs[s][:k].addmm_(dpre[:k], w)
