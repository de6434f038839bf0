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

from typing import NamedTuple

import torch

from ..recurrent import LayerParams
from .layer_trace import LayerTrace, stack_steps, step_masks


def run(p: LayerParams, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, *,
        reverse: bool, lengths: torch.Tensor | None = None) -> LayerTrace:
    """Unroll one layer/direction. x (B, T, I_l), h0 (B, H_out), c0 (B, H).

    lengths (B,): each sample's valid length; at positions t ≥ lengths[b] h and c are carried
    through unchanged (the gates there are computed but not valid).

    Without a projection each step is two autograd nodes with closed-form backwards
    (`_LSTMCellState`, `_LSTMHidden`) instead of about ten, and the
    recurrent weight's gradient is one GEMM over all steps (`_RecurrentWeightGrad`); with a
    projection (proj_size > 0) the step is recorded op by op by autograd. Both compute the
    forward with the same operations, so states and gates are the same numbers either way.
    """
    H = p.w_hh.shape[0] // 4
    # both biases in the input projection's GEMM (b_ih + b_hh is 4H adds, not a pass over
    # (B, T, 4H)); autograd hands each bias the same gradient
    bias = p.b_ih if p.b_hh is None else p.b_hh if p.b_ih is None else p.b_ih + p.b_hh
    gx = torch.nn.functional.linear(x, p.w_ih, bias)  # (B, T, 4H)
    fast = p.w_hr is None
    record = None
    if fast and torch.is_grad_enabled() and p.w_hh.requires_grad:
        record = _PrevStates(h0, reverse)
        # W_hh through a view of its own: the view's node tells the backward whether W_hh's
        # gradient is wanted (`_engine_needs`; a leaf's own node cannot be asked under
        # autograd.grad)
        gx = _RecurrentWeightGrad.apply(gx, p.w_hh.view_as(p.w_hh), record)
    steps = gx.unbind(1)  # unbind once: indexing gx[:, t] per step makes backward O(T^2)
    if reverse:
        steps = steps[::-1]
    # the fast step never differentiates w.r.t. W_hh itself (see _RecurrentWeightGrad)
    w_hh_t = p.w_hh.detach().t() if fast else p.w_hh.t()
    w_hr_t = p.w_hr.t() if p.w_hr is not None else None
    masks = step_masks(lengths, len(steps), x.device, reverse)
    recorded = fast and torch.is_grad_enabled()
    h, c = h0, c0
    hs, cs, sigs, gs = [], [], [], []
    for gx_t, m in zip(steps, masks):
        if recorded:
            c_new, sig, g = _LSTMCellState.apply(gx_t, h, c, w_hh_t)
        else:  # no graph, or a projection: autograd records the ops (if grad mode is on)
            sig, g, c_new = _cell_state(gx_t, h, c, w_hh_t)
        if m is not None:
            # Select the carried cell state BEFORE h is computed from it: the step's c tensor
            # (whose gradient state_gradients reads) must be the one h_t depends on, or ∂L/∂c_t
            # would miss the path through h_t at every step of a packed batch.
            c_new = torch.where(m, c_new, c)
        if recorded:
            h_new = _LSTMHidden.apply(sig, c_new)
        else:
            h_new = sig[:, 3 * H:] * torch.tanh(c_new)
            if w_hr_t is not None:
                h_new = h_new @ w_hr_t
        h = h_new if m is None else torch.where(m, h_new, h)
        c = c_new
        hs.append(h)
        cs.append(c)
        sigs.append(sig)
        gs.append(g)
    if record is not None:
        record.hs = [t.detach() for t in hs]

    def gates():
        sig_all = stack_steps(sigs, reverse)
        return {"i": sig_all[..., :H], "f": sig_all[..., H:2 * H], "g": stack_steps(gs, reverse),
                "o": sig_all[..., 3 * H:]}

    return LayerTrace(x=x, h=stack_steps(hs, reverse), h0=h0, c0=c0, reverse=reverse,
                      steps_h=tuple(hs), steps_c=tuple(cs), gate_builder=gates,
                      lengths=lengths)


def _cell_state(gx_t, h, c, w_hh_t):
    """One step of PyTorch's equations up to c': gx_t (B, 4H) input part (biases included),
    h (B, H_out), c (B, H), w_hh_t (H_out, 4H). Returns sig = σ(pre) (B, 4H) (blocks i, f, o
    used; block g discarded), g = tanh(pre_g) (B, H) and c' (B, H)."""
    H = c.shape[1]
    pre = torch.addmm(gx_t, h, w_hh_t)  # (B, 4H)
    sig = torch.sigmoid(pre)
    i, f = sig[:, :H], sig[:, H:2 * H]
    g = torch.tanh(pre[:, 2 * H: 3 * H])
    return sig, g, torch.addcmul(f * c, i, g)


_sigmoid_backward = torch.ops.aten.sigmoid_backward  # (grad, σ) -> grad · σ(1 − σ)
_tanh_backward = torch.ops.aten.tanh_backward  # (grad, tanh) -> grad · (1 − tanh²)


def _refuse_double_backward() -> None:
    """The closed-form backwards below are first derivatives only: under create_graph=True
    their results would silently lack the second-order terms, so refuse."""
    if torch.is_grad_enabled():
        raise RuntimeError("the LSTM replay's steps have a closed-form first derivative only; "
                           "got a backward with create_graph=True (double backward), which it "
                           "cannot give exactly: unroll an nn.LSTMCell over the sequence with "
                           "plain autograd for higher derivatives")


class _LSTMCellState(torch.autograd.Function):
    """c' and the gates of one LSTM step as a single autograd node with the closed-form backward.

    forward(gx_t (B, 4H), h (B, H), c (B, H), w_hh_t (H, 4H), detached) -> (c', sig, g), with
    sig = σ(pre) (B, 4H) (blocks i, f, o used) and g = tanh(pre_g) (B, H).
    backward, from dc = ∂L/∂c' (total: it includes what came back through h' = o tanh c', see
    `_LSTMHidden`), dsig and dg (what reached the exposed gates, o's included):
        d(pre) = (dsig + [dc·g, dc·c, 0, 0]) σ(1 − σ), its g block + (dc·i + dg)(1 − g²)
        ∂L/∂gx_t = d(pre),  ∂L/∂h = d(pre) W_hh,  ∂L/∂c = dc · f.
    W_hh's own gradient, Σ_t d(pre_t)ᵀ h_{t−1}, is left to `_RecurrentWeightGrad` (one GEMM).
    c' is an output of its own (not folded into h'), so a gradient taken w.r.t. the c_t
    tensor is the total one, as on an op-by-op graph.
    """

    @staticmethod
    def forward(ctx, gx_t, h, c, w_hh_t):
        sig, g, c_new = _cell_state(gx_t, h, c, w_hh_t)
        ctx.set_materialize_grads(False)  # outputs nobody reads get None, not a zero tensor
        ctx.save_for_backward(sig, g, c, w_hh_t)
        return c_new, sig, g

    @staticmethod
    def backward(ctx, dc, dsig, dg):
        _refuse_double_backward()
        sig, g, c, w_hh_t = ctx.saved_tensors
        H = g.shape[1]
        if dc is None:
            dc = torch.zeros_like(g)
        d = torch.zeros_like(sig) if dsig is None else dsig.clone()  # ∂L/∂sig, block by block
        d_i, d_f = d[:, :H], d[:, H:2 * H]
        d_i.addcmul_(dc, g)
        d_f.addcmul_(dc, c)
        d_pre = _sigmoid_backward(d, sig)  # the unused g block of sig: 0 unless dsig had it
        i, f = sig[:, :H], sig[:, H:2 * H]
        d_g = dc * i if dg is None else torch.addcmul(dg, dc, i)
        d_pre[:, 2 * H: 3 * H] += _tanh_backward(d_g, g)
        return d_pre, d_pre @ w_hh_t.t(), dc * f, None


class _LSTMHidden(torch.autograd.Function):
    """h' = o ⊙ tanh(c') as one node: forward(sig (B, 4H), c' (B, H)) -> h' (B, H).

    backward: ∂L/∂sig = [0, 0, 0, dh·tanh c'],  ∂L/∂c' = dh · o (1 − tanh² c').
    """

    @staticmethod
    def forward(ctx, sig, c_new):
        H = c_new.shape[1]
        o = sig[:, 3 * H:]
        tanh_c = torch.tanh(c_new)
        ctx.save_for_backward(o, tanh_c)
        return o * tanh_c

    @staticmethod
    def backward(ctx, dh):
        _refuse_double_backward()
        o, tanh_c = ctx.saved_tensors
        H = o.shape[1]
        d_sig = dh.new_zeros(dh.shape[0], 4 * H)
        torch.mul(dh, tanh_c, out=d_sig[:, 3 * H:])
        return d_sig, _tanh_backward(dh * o, tanh_c)


class _PrevStates:
    """The states entering each step of one layer/direction, filled in after the forward loop
    (detached: holding graph tensors here would tie the graph into a reference cycle)."""

    def __init__(self, h0: torch.Tensor, reverse: bool):
        self.h0, self.reverse, self.hs = h0.detach(), reverse, None

    def in_positions(self) -> torch.Tensor:
        """(B, T, H_out): at position t, the state the step reading x[:, t] started from."""
        return stack_steps([self.h0] + self.hs[:-1], self.reverse)


class _RecurrentWeightGrad(torch.autograd.Function):
    """Identity on the input projection gx (B, T, 4H) that also takes W_hh, so that W_hh's
    gradient Σ_t d(pre_t)ᵀ h_{t−1} is one (4H, B·T) @ (B·T, H) GEMM after the backward sweep.

    d(pre_t) = ∂L/∂gx_t exactly (pre_t = gx_t + h_{t−1} W_hhᵀ), so the gradient this node
    receives is all it needs, with the forward's states held in `record` (`_PrevStates`).
    """

    @staticmethod
    def forward(ctx, gx, w_hh, record):
        ctx.record = record
        ctx.w_node = w_hh.grad_fn  # the view's (see `run`)
        return gx.view_as(gx)

    @staticmethod
    def backward(ctx, d_gx):
        _refuse_double_backward()
        d_w = None
        if ctx.needs_input_grad[1] and _engine_needs(ctx.w_node):
            prev = ctx.record.in_positions()  # (B, T, H_out)
            d_w = d_gx.reshape(-1, d_gx.shape[-1]).t() @ prev.reshape(-1, prev.shape[-1])
        return d_gx, d_w, None


def _engine_needs(node) -> bool:
    """Whether the running backward executes `node` (a non-leaf node): not when
    autograd.grad(...) asks for other tensors only (the state gradients and ∂L/∂x of
    `compare`), where W_hh's gradient, a (4H, B·T) @ (B·T, H) GEMM, would be computed for
    nothing. True when it cannot tell (no node; the private check missing or refusing)."""
    check = getattr(torch._C, "_will_engine_execute_node", None)
    if node is None or check is None:
        return True
    try:
        return bool(check(node))
    except RuntimeError:
        return True


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
    e = _e_scale(tr.step_range(tr.gates["o"], n), tr.step_range(tr.c, n))
    if p.w_hr is None:
        return torch.diag_embed(e)
    return p.w_hr * e.unsqueeze(-2)


def step_jacobians(p: LayerParams, tr: LayerTrace, n: slice) -> torch.Tensor:
    """Exact full-state one-step Jacobians F_n = ∂(h_n, c_n)/∂(h_{n−1}, c_{n−1}) for processing
    steps n in the slice: (B, S, P+H, P+H), rows and columns ordered (h, c).

    The reduced views follow from F: ∂c_n/∂c_{n−1} = [0 I] F_n [E_{n−1}; I] = diag(f_n) +
    K_n E_{n−1} (with E_{−1} = 0: the initial h0 is an input, not a function of c0).
    """
    i, f, g, o = (tr.step_range(tr.gates[k], n) for k in ("i", "f", "g", "o"))
    c_prev = tr.prev_c[:, n]
    k = _k_matrix(p, i, f, g, c_prev)  # (B, S, H, P)
    H = p.w_hh.shape[0] // 4
    c_now = tr.step_range(tr.c, n)
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


def cell_state_steps(p: LayerParams, tr: LayerTrace, n: slice, e_before: torch.Tensor | None):
    """The cell-state one-step Jacobians of an LSTM without projection, split: (f (B, S, H),
    indirect (B, S, H, H), e of the slice's last step (B, H)), where

        ∂c_n/∂c_{n−1} = diag(f_n) + K_n diag(e_{n−1}),   e = o (1 − tanh² c)

    (E_{n−1} = diag(e_{n−1}) without a projection, so K_n E_{n−1} scales K's columns).
    `e_before` (B, H): e of the step before the slice, None at step 0 (E_{−1} = 0: h0 is an
    input). The same numbers as the full-state route, `step_jacobians` then [0 I] F [E; I],
    without the (P+H)² matrices or a matrix product per step."""
    i, f, g, o = (tr.step_range(tr.gates[k], n) for k in ("i", "f", "g", "o"))
    k = _k_matrix(p, i, f, g, tr.prev_c[:, n])  # (B, S, H, H)
    e = _e_scale(o, tr.step_range(tr.c, n))  # (B, S, H)
    first = torch.zeros_like(e[:, :1]) if e_before is None else e_before.unsqueeze(1)
    e_prev = torch.cat([first, e[:, :-1]], dim=1)
    return f, k * e_prev.unsqueeze(-2), e[:, -1]


# ----------------------------------------------------------------------------------------------
# The one-step vector-Jacobian product (the contract every cell module shares: `vjp_weights`,
# `vjp_saved`, `step_vjp`; see cells/__init__.py)


class VJPWeights(NamedTuple):
    """One layer/direction's weights as the step VJP reads them (detached views, made once).

    w_hh (4H, P) PyTorch's recurrent weight (P = H_out); w_ifg (3, H, P) and w_o (H, P) its
    gate blocks; w_hr (P, H) the projection or None; w_in (4H, P + I) = [W_hh | W_ih] with
    `vjp_weights(p, inputs=True)` (for `step_vjp(..., into=)`), else None.
    """

    w_hh: torch.Tensor
    w_ifg: torch.Tensor
    w_o: torch.Tensor
    w_hr: torch.Tensor | None
    w_in: torch.Tensor | None = None


class VJPSaved(NamedTuple):
    """What one LSTM step's VJP reads, besides the weights; each field (…, H) or (…, 3, H),
    broadcast against the cotangents' leading dimensions.

    e = ∂(o ⊙ tanh c_n)/∂c_n = o (1 − tanh² c_n); d_o = ∂(o ⊙ tanh c_n)/∂pre_o =
    tanh(c_n) o (1 − o); d_ifg (…, 3, H) = ∂c_n/∂(pre_i, pre_f, pre_g) =
    (g i (1 − i), c_{n−1} f (1 − f), i (1 − g²)); f the forget gate.
    """

    e: torch.Tensor
    d_o: torch.Tensor
    d_ifg: torch.Tensor
    f: torch.Tensor


def vjp_weights(p: LayerParams, *, inputs: bool = False) -> VJPWeights:
    """The detached weight views `step_vjp` reads (make them once per layer/direction);
    inputs=True also joins W_ih for `step_vjp(..., into=)`."""
    w_hh = p.w_hh.detach()
    H = w_hh.shape[0] // 4
    w = w_hh.view(4, H, -1)
    w_in = torch.cat([w_hh, p.w_ih.detach()], dim=1) if inputs else None
    return VJPWeights(w_hh, w[:3], w[3], None if p.w_hr is None else p.w_hr.detach(), w_in)


def vjp_saved(i, f, g, o, c_prev, c) -> VJPSaved:
    """`VJPSaved` for any number of steps at once from the gates i, f, g, o, the cell state
    entering the step c_prev and the one it makes c, all the same shape (…, H)."""
    tanh_c = torch.tanh(c)
    o_tc = o * tanh_c
    ig = i * g
    c_f = c_prev * f
    d_ifg = torch.stack([torch.addcmul(ig, ig, i, value=-1), torch.addcmul(c_f, c_f, f, value=-1),
                         torch.addcmul(i, ig, g, value=-1)], dim=-2)
    return VJPSaved(e=torch.addcmul(o, o_tc, tanh_c, value=-1),
                    d_o=torch.addcmul(o_tc, o_tc, o, value=-1), d_ifg=d_ifg, f=f)


def vjp_saved_from_trace(p: LayerParams, tr: LayerTrace, *, nonlinearity: str = "tanh"):
    """`VJPSaved` of every step of a replayed layer/direction, (B, T, …) in processing order,
    detached (nonlinearity: unused, taken by every cell's version)."""
    i, f, g, o = (tr.in_steps(tr.gates[k]).detach() for k in ("i", "f", "g", "o"))
    return vjp_saved(i, f, g, o, tr.prev_c.detach(), tr.in_steps(tr.c).detach())


def vjp_saved_from_states(p: LayerParams, x: torch.Tensor, h_prev: torch.Tensor,
                          h: torch.Tensor, c0: torch.Tensor, *, nonlinearity: str = "tanh"):
    """`VJPSaved` of every step at once, (T, B, …), from a layer's time-major input x
    (T, B, I), the states entering its steps h_prev (T, B, P), the states they made h (unused
    here) and c0 (B, H): the gates need no loop over time, the cell states one elementwise
    recurrence."""
    T, B = x.shape[:2]
    H = p.w_hh.shape[0] // 4
    bias = [b.detach() for b in (p.b_ih, p.b_hh) if b is not None]
    x2, w_ih = x.reshape(T * B, -1), p.w_ih.detach().t()
    pre = torch.addmm(sum(bias), x2, w_ih) if bias else torch.mm(x2, w_ih)
    pre = pre.addmm_(h_prev.reshape(T * B, -1), p.w_hh.detach().t()).view(T, B, 4 * H)
    act = torch.empty_like(pre)  # σ for i, f, o; tanh for g
    torch.sigmoid(pre[..., :2 * H], out=act[..., :2 * H])
    torch.tanh(pre[..., 2 * H:3 * H], out=act[..., 2 * H:3 * H])
    torch.sigmoid(pre[..., 3 * H:], out=act[..., 3 * H:])
    i, f, g, o = act.split(H, dim=-1)
    c = _cell_states(i * g, f, c0)  # (T + 1, B, H): c_{-1} = c0, then c_0 … c_{T-1}
    return vjp_saved(i, f, g, o, c[:-1], c[1:])


def _cell_states(ig: torch.Tensor, f: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """(T + 1, B, H) cell states c_s = f_s c_{s−1} + i_s g_s from c_{−1} = c0."""
    c = ig.new_empty((ig.shape[0] + 1,) + tuple(ig.shape[1:]))
    c[0] = c0
    cs = c.unbind(0)
    for s, (ig_s, f_s) in enumerate(zip(ig.unbind(0), f.unbind(0))):
        torch.addcmul(ig_s, f_s, cs[s], out=cs[s + 1])
    return c


def step_vjp(w: VJPWeights, s: VJPSaved, d_state: tuple, *, fold: bool = False,
             dc_total: torch.Tensor | None = None, into: torch.Tensor | None = None):
    """One step's VJP: from the cotangents of the state a step makes, (h_n, c_n), to those of
    the state it started from, (h_{n−1}, c_{n−1}), and of its input projection gx_n.

    Args:
        w: `vjp_weights(p)`.
        s: the step's `VJPSaved`, broadcastable against the cotangents ((B, H) against stacked
            rows (R, B, ·); (B, 1, H) against per-sample rows (B, N, ·)).
        d_state: (dh (…, P), dc (…, H)), h_n and c_n taken as independent (dc does not include
            the path through h_n = o_n tanh c_n; this step adds it).
        fold: d_state holds N rows per sample, (B, N, ·), and s is (B, 1, ·): fold the i, f, g
            blocks into one (B, H, P) matrix K_n = Σ diag(d_ifg) W per sample (3·H·P to build,
            then 2·N·H·P multiply-adds per sample instead of 4·N·H·P). d_in is then not formed.
        dc_total: if given, (…, H) receives the total ∂/∂c_n (h_n moving with c_n): the
            cell-state span Jacobian's row.
        into: if given (needs `vjp_weights(p, inputs=True)`), a contiguous (…, P + I) tensor
            the step adds (∂/∂h_{n−1} | ∂/∂x_n) into, with one GEMM; dh_{n−1} is then its first
            P columns (what was in them plus the step's part), and d_state's dc (then the
            caller's running buffer) is turned into dc_{n−1} in place.

    Returns:
        ((dh_{n−1} (…, P), dc_{n−1} (…, H)), d_in (…, 4H) = ∂/∂gx_n = ∂/∂pre_n, or None with
        fold). The input gradient is d_in W_ih.
    """
    dh, dc = d_state
    dm = dh if w.w_hr is None else dh @ w.w_hr  # ∂/∂(o ⊙ tanh c_n)
    if into is not None:  # the caller's running buffers: dc becomes dc_{n−1} in place
        dct = dc.addcmul_(dm, s.e)
    elif dc_total is not None:
        dct = torch.addcmul(dc, dm, s.e, out=dc_total)
    else:
        dct = torch.addcmul(dc, dm, s.e)
    if fold:
        k = _fold(s.d_ifg.squeeze(1), w.w_ifg)  # K_n (B, H, P)
        dh_prev = torch.baddbmm((dm * s.d_o) @ w.w_o, dct, k)
        return (dh_prev, dct * s.f), None
    lead = dct.shape[:-1]
    H = dct.shape[-1]
    d_in = dct.new_empty(*lead, 4, H)
    torch.mul(dct.unsqueeze(-2), s.d_ifg, out=d_in[..., :3, :])
    torch.mul(dm, s.d_o, out=d_in[..., 3, :])
    d_in = d_in.view(*lead, 4 * H)
    if into is not None:
        P = w.w_hh.shape[1]
        into.view(-1, into.shape[-1]).addmm_(d_in.view(-1, 4 * H), w.w_in)
        return (into[..., :P], dct.mul_(s.f)), d_in
    dh_prev = (d_in.view(-1, 4 * H) @ w.w_hh).view(*lead, -1)
    return (dh_prev, dct * s.f), d_in


def step_jvp(w: VJPWeights, s: VJPSaved, v: torch.Tensor) -> torch.Tensor:
    """The full-state one-step Jacobian F_n (see `step_jacobians`) applied to columns, without
    forming it: v (B, P + H, k) -> F_n v (B, P + H, k), rows ordered (h, c).

        u = W_hh v_h,   dc = Σ_{g ∈ i,f,g} d_g ⊙ u_g + f ⊙ v_c,   dh = [W_hr] (d_o ⊙ u_o + e ⊙ dc)

    with s's fields (B, H) and (B, 3, H) for one step: one (4H, P) product per column instead
    of building the (P + H)² entries of F_n (what the Lyapunov QR method needs per step).
    """
    P = w.w_hh.shape[1]
    B, H, k = s.f.shape[0], s.f.shape[-1], v.shape[-1]
    u = (w.w_hh @ v[:, :P]).view(B, 4, H, k)  # (B, 4, H, k) blocks i, f, g, o
    dc = torch.addcmul((s.d_ifg.unsqueeze(-1) * u[:, :3]).sum(1), s.f.unsqueeze(-1), v[:, P:])
    dm = torch.addcmul(s.d_o.unsqueeze(-1) * u[:, 3], s.e.unsqueeze(-1), dc)
    return torch.cat([dm if w.w_hr is None else w.w_hr @ dm, dc], dim=1)


def _fold(coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_g diag(coef[:, g]) w[g]: coef (B, G, H), w (G, H, P) -> (B, H, P), accumulated block
    by block (no (B, G, H, P) temporary)."""
    out = coef[:, 0].unsqueeze(-1) * w[0]
    for g in range(1, w.shape[0]):
        out.addcmul_(coef[:, g].unsqueeze(-1), w[g])
    return out
