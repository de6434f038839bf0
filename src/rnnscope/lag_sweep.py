"""lag_profile's fast path: one adjoint sweep through a fused recurrent module for all positions.

When the gradient is measured at the input of a fused, unidirectional nn.LSTM / nn.GRU / nn.RNN
(the model itself, or a submodule), ‖∂ℓ_t/∂x_s‖ for P loss positions t splits exactly into

1. the head: cotangents ∂ℓ_t/∂(output, h_n, c_n) of the module's returned tensors, for all
   positions at once with one batched vector-Jacobian product through whatever the model does
   after the recurrence (`torch.autograd.grad(..., is_grads_batched=True)`) — exact for any head;
2. the recurrence: one backward sweep over time with the closed-form one-step adjoint of the
   cell (PyTorch's equations), no autograd graph, with all positions' adjoints stacked as
   R = P·B rows. The gates it needs are recomputed for all steps at once from each layer's
   input and output sequence: for a one-layer module the fused kernel's own input and output,
   for deeper ones `replay`'s per-layer states.

The adjoint is linear, so a position whose cotangents are zero after step t_p has a zero adjoint
there: the sweep starts each position at its own last nonzero step (read from the cotangents, so
a head that mixes time forward or backward stays exact) and grows the active rows as it goes
back. Rows are ordered by start step, latest first, so the active rows at each step are a
prefix and every per-step operation works on one contiguous slice. Each step is the cell's
`step_vjp` (cells/__init__.py: the same contract as span_sweep's), given the caller's buffers
(`into=`): the gradient at the layer's input, dx_s = d_in_s W_ih, comes out of the same GEMM as
the recurrent one (d_in_s [W_hh | W_ih] for the LSTM and RNN). A multi-layer module is swept top
layer first, each layer's input gradient being the next one down's output cotangent.

Everything else (bidirectional modules, packed sequences, cells, training-mode inter-layer
dropout, custom modules, a loss reaching the measured input around the recurrent module) takes
lag_profile's general path; `plan` says why. The training-time monitor, which holds the replay
that redrew the dropout masks, sweeps through dropout too (`output_step_lag_norms(trace=)`).

Shape legend: P loss positions, B batch, R = P·B adjoint rows (row j·B + b: the j-th position
in sweep order, sample b), T steps, I_l the layer's input features, H hidden units, Ho the
layer's output size (the projection size with proj_size > 0, else H), L layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .cells import CELLS
from .checks import narrow_state
from .recurrent import check_subclass, describe
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
    if fwd.axes.layout == "packed":
        return None, "packed sequences"
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
        check_subclass(module)  # a subclass must compute its parent's equations
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
              head_vjps, *, trace=None, samples: int | None = None) -> tuple[torch.Tensor, str]:
    """(B, P, T) float64 norms ‖∂ℓ_{t_p}/∂x_s‖ and the method's name.

    onehot (P, B, T) selects each position's losses (as in the general path); head_vjps is
    lag_profile's batched-VJP helper, returning per-position gradients (P, ...) of the losses
    with respect to the module's returned tensors. `trace`: a `replay` of the module on site.x
    whose layers the sweep reads instead of replaying; with training-mode inter-layer dropout
    it must be the replay that redrew the kernel's masks (`replay(..., rng_state=)`), and each
    layer's input gradient is multiplied by the mask of the layer below (x_{l+1} = h_l ⊙ mask_l)
    before it becomes that layer's output cotangent. `samples`: site.x and site.outputs hold
    only the first `samples` of the batch `trace` was replayed on; its layers and masks are
    read for those samples.
    """
    spec = describe(site.module)
    grads, head_method = head_vjps(losses, site.outputs, onehot)
    g_out, g_state = grads[0], list(grads[1:])  # (P, *output.shape), (P, L, B, ·) each
    x = site.x
    P = onehot.shape[0]
    B, T = (x.shape[0], x.shape[1]) if spec.batch_first else (x.shape[1], x.shape[0])
    R = P * B
    with torch.no_grad():
        g_out = g_out if spec.batch_first else g_out.transpose(1, 2)  # (P, B, T, Ho)
        starts = _starts(g_out, g_state)  # each position's last step with a cotangent
        order = sorted(range(P), key=lambda p: -starts[p])  # sweep order: latest start first
        rows = Rows.build([starts[p] for p in order], B, T, g_out.device)
        layers = _layer_sequences(site, spec, trace, samples)
        # (B, T, Ho) per layer below the top
        masks = () if trace is None else tuple(m[:samples] for m in trace.dropout_masks)
        # the top layer's output cotangents in the row layout: step s's rows are positions
        # order[0 .. q_s) (q_s = active_s / B), each with its B samples
        pidx = [order[j] for s in range(T - 1, -1, -1) for j in range(rows.active[s] // B)]
        sidx = [s for s in range(T - 1, -1, -1) for _ in range(rows.active[s] // B)]
        as_index = lambda v: torch.tensor(v, dtype=torch.long, device=g_out.device)  # noqa: E731
        dh = g_out.permute(0, 2, 1, 3)[as_index(pidx), as_index(sidx)]  # (pairs, B, Ho)
        dh = dh.reshape(-1, g_out.shape[-1])  # (rows.n_steps, Ho)
        perm = torch.tensor(order, device=g_out.device)
        state_cots = [g.index_select(0, perm) for g in g_state]  # (P, L, B, ·), sweep order
        for layer in reversed(range(spec.num_layers)):
            h_cot, c_cot = [None if g is None else g[:, layer].reshape(R, -1)
                            for g in (state_cots + [None, None])[:2]]
            dh = _sweep_layer(spec, layer, layers[layer], rows, dh, h_cot, c_cot)
            if layer > 0 and masks:  # through the dropout between layer − 1 and layer
                dh = dh * _in_rows(masks[layer - 1], rows, B, R).to(dh.dtype)
        # dh now holds ∂ℓ/∂x_s in the row layout: scatter the norms into (T, R), zero elsewhere
        flat = torch.linalg.vector_norm(dh, dim=-1).to(torch.float64)
        norms = flat.new_zeros(T * R).index_copy_(0, rows.dense_index, flat).view(T, P, B)
        norms = norms.index_select(1, torch.argsort(perm)).permute(2, 1, 0)  # (B, P, T)
    return norms.cpu(), f"{METHOD} ({spec.kind}, head: {head_method})"


@dataclass
class Rows:
    """The sweep's row layout: only the rows that carry a value, step after step.

    Rows are (position in sweep order j, sample b) pairs, r = j·B + b; at step s the active
    rows are the prefix r < active[s] (positions whose start is ≥ s). The sweep's buffers hold,
    for s = T − 1 down to 0, the active rows of step s one after the other (`seg[s + 1]` is
    where step s begins), then one more segment of active[0] rows for step −1. A step's GEMM
    reads its own segment and writes the first active[s] rows of the segment after it, so
    (∂ℓ/∂h_{s−1} | ∂ℓ/∂x_s) land together, and nothing is computed for inactive rows.
    """

    active: list          # (T,) active rows per step
    seg: list             # (T + 1,) seg[s + 1]: the first row of step s (s = −1 … T − 1)
    n: int                # all rows, step −1's segment included
    n_steps: int          # rows of steps 0 … T − 1 (= seg[0])
    dx_index: torch.Tensor     # (n_steps,) where ∂ℓ/∂x_s of step s's rows is, s = T − 1 … 0
    dense_index: torch.Tensor  # (n_steps,) the same rows' places in a (T, R) array

    @staticmethod
    def build(row_start: list, B: int, T: int, device) -> "Rows":
        active = [B * sum(1 for st in row_start if st >= s) for s in range(T)]
        R = B * len(row_start)
        seg = [0] * (T + 1)
        for s in range(T - 2, -2, -1):
            seg[s + 1] = seg[s + 2] + active[s + 1]
        n = seg[0] + active[0]
        steps = [s for s in range(T - 1, -1, -1) if active[s]]
        as_index = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        lengths = as_index([active[s] for s in steps])
        # within-segment row numbers 0 … active[s] − 1, for every step's segment in turn
        first = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(seg[0], device=device) - first.repeat_interleave(lengths)
        dx_index = as_index([seg[s] for s in steps]).repeat_interleave(lengths) + within
        dense_index = as_index([s * R for s in steps]).repeat_interleave(lengths) + within
        return Rows(active, seg, n, seg[0], dx_index, dense_index)


@dataclass
class LayerSequences:
    """One layer's forward, time-major: x (T, B, I_l) its input, h (T, B, Ho) its output
    states, h0 (B, Ho) and c0 (B, H; LSTM) its initial state. Views are fine."""

    x: torch.Tensor
    h: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor | None


def _in_rows(per_step: torch.Tensor, rows: Rows, B: int, R: int) -> torch.Tensor:
    """(B, T, F) batch-major values -> (rows.n_steps, F) in the sweep's row layout: the row of
    step s and adjoint row r = j·B + b takes sample b's value at step s (R = P·B: a row's
    dense index is s·R + r)."""
    s_idx = torch.div(rows.dense_index, R, rounding_mode="floor")
    b_idx = rows.dense_index.remainder(R).remainder(B)
    return per_step.to(rows.dense_index.device)[b_idx, s_idx]


def _layer_sequences(site: SweepSite, spec, trace=None, samples: int | None = None) -> list:
    """Every layer's input and output sequence. A one-layer module's are what it received and
    returned (the fused kernel's own values, nothing recomputed); a deeper module's inner
    layers are not exposed by the kernel, so they come from `trace` if given (its first
    `samples` samples; all with None), else `replay`."""
    x = site.x.detach()
    if trace is not None:
        n = slice(samples)
        return [LayerSequences(lt.x.detach()[n].transpose(0, 1),
                               lt.h.detach()[n].transpose(0, 1), lt.h0.detach()[n],
                               None if lt.c0 is None else lt.c0.detach()[n])
                for (lt,) in trace.layers]
    if spec.num_layers == 1:
        out = site.outputs[0].detach()
        tm = (lambda t: t.transpose(0, 1)) if spec.batch_first else (lambda t: t)
        B = out.shape[0] if spec.batch_first else out.shape[1]
        h0, c0 = _initial_state(site.hx, spec, B, out)
        return [LayerSequences(tm(x), tm(out), h0, c0)]
    trace = replay(site.module, x, _detached(site.hx))
    return [LayerSequences(lt.x.transpose(0, 1), lt.h.transpose(0, 1), lt.h0, lt.c0)
            for (lt,) in trace.layers]


def _initial_state(hx, spec, B: int, like: torch.Tensor):
    """(h0, c0) of layer 0 of a one-layer module: (B, Ho), (B, H) or None."""
    if hx is None:
        h0 = like.new_zeros(B, spec.hidden_out)
        c0 = like.new_zeros(B, spec.hidden_size) if spec.has_cell_state else None
        return h0, c0
    if spec.has_cell_state:
        return hx[0].detach()[0], hx[1].detach()[0]
    return hx.detach()[0], None


def _detached(hx):
    if isinstance(hx, torch.Tensor):
        return hx.detach()
    if isinstance(hx, (tuple, list)):
        return type(hx)(t.detach() if isinstance(t, torch.Tensor) else t for t in hx)
    return hx


def _starts(g_out: torch.Tensor, g_state: list) -> list:
    """For each position the last step with a nonzero cotangent (T − 1 when the final state is
    used; −1 when nothing is). NaN counts as nonzero, so it propagates as in autograd."""
    P, B, T = g_out.shape[:3]
    nonzero = (_squeeze_broadcast(g_out) != 0).flatten(3).any(3).any(1)  # (P, T)
    steps = torch.arange(T, device=g_out.device)
    starts = torch.where(nonzero, steps, -1).amax(1)
    for g in g_state:
        used = (g != 0).reshape(P, -1).any(1)
        starts = torch.where(used, T - 1, starts)
    return starts.tolist()


def _squeeze_broadcast(g: torch.Tensor) -> torch.Tensor:
    """g without the repeats of its broadcast (stride-0) feature dimensions: a head like
    out.sum(-1) returns its cotangent expanded over the features, and reading every repeat
    would cost a full pass over (P, B, T, Ho). Batch, position and time dimensions are kept."""
    for d in range(3, g.dim()):
        if g.stride(d) == 0 and g.shape[d] > 1:
            g = g.narrow(d, 0, 1)
    return g


def _sweep_layer(spec, layer: int, lt, rows: Rows, dh: torch.Tensor, h_cot,
                 c_cot) -> torch.Tensor:
    """One layer's backward sweep over time.

    dh (rows.n_steps, Ho): the layer's output cotangents in the row layout. Returns its input
    gradients (rows.n_steps, I_l) in the same layout (the next layer down's dh).
    Z (rows.n, Ho + I_l) holds (∂ℓ/∂h_s | ∂ℓ/∂x_{s+1}) in step s's segment: the output
    cotangent is there before the sweep and step s + 1's GEMM adds the recurrent part.
    """
    p = spec.params(layer, 0)
    Ho, I = dh.shape[1], p.w_ih.shape[1]
    T = len(rows.active)
    Z = dh.new_empty(rows.n, Ho + I)
    Z[: rows.n_steps, :Ho] = dh
    Z[rows.n_steps:, :Ho].zero_()
    Z[:, Ho:].zero_()
    k = rows.active[T - 1]
    if h_cot is not None and k:
        Z[:k, :Ho] += h_cot[:k]  # rows with a final-state cotangent all start at T − 1
    cell = CELLS[spec.kind]
    w = cell.vjp_weights(p, inputs=True)
    saved = _saved(spec, p, lt)  # the cell's VJPSaved, (T, B, …) each field
    per_step = [type(saved)(*fields) for fields in zip(*(t.unbind(0) for t in saved))]
    B = lt.h.shape[1]
    R = rows.active[0]  # step 0 has the most active rows
    dc = None
    if spec.kind == "lstm":  # the cell-state cotangents, carried outside Z (rows beyond the
        H = p.w_hh.shape[0] // 4  # active prefix keep their final-state cotangent until used)
        dc = Z.new_zeros(R, H)
        if c_cot is not None:
            dc += c_cot
    for s, k, here, nxt in _segments(rows, Z):
        q = k // B
        d_state = (here[:, :Ho].view(q, B, Ho),)
        if dc is not None:
            d_state += (dc[:k].view(q, B, -1),)
        # (∂ℓ/∂h_{s−1} | ∂ℓ/∂x_s) added into step s − 1's rows of Z; dc turned into dc_{s−1}
        cell.step_vjp(w, per_step[s], d_state, into=nxt.view(q, B, -1))
    return Z[:, Ho:].index_select(0, rows.dx_index)


def _segments(rows: Rows, Z: torch.Tensor):
    """Per step s = T − 1 … 0 with active rows: (s, k, this step's rows of Z, the rows of
    step s − 1 that its VJP writes) — views made once, outside the arithmetic."""
    B_rows = rows.active
    out = []
    for s in range(len(B_rows) - 1, -1, -1):
        k = B_rows[s]
        if k:
            out.append((s, k, Z[rows.seg[s + 1]: rows.seg[s + 1] + k],
                        Z[rows.seg[s]: rows.seg[s] + k]))
    return out


def _previous(lt: LayerSequences) -> torch.Tensor:
    """(T, B, Ho) the state entering each step: h0, h_0, …, h_{T−2}."""
    return torch.cat([lt.h0.unsqueeze(0), lt.h[:-1]])


def _saved(spec, p, lt: LayerSequences):
    """The cell's VJPSaved for every step at once, (T, B, …) each field, recomputed from the
    layer's input and output sequences (no loop over time but the LSTM's elementwise c)."""
    return CELLS[spec.kind].vjp_saved_from_states(p, lt.x, _previous(lt), lt.h, lt.c0,
                                                  nonlinearity=spec.nonlinearity)


# ----------------------------------------------------------------------------------------------
# Given output-step cotangents (the training-time monitor)


def output_step_lag_norms(module: nn.RNNBase, x: torch.Tensor, hx, output: torch.Tensor,
                          cotangents: torch.Tensor, *, trace=None,
                          samples: int | None = None) -> torch.Tensor:
    """(B, P, T) float64 norms ‖∂(g_p · y)/∂x_s‖ for P given output cotangents g_p, one sweep.

    For the GradientMonitor: g_p is the gradient the real training loss sent to the module's
    output, kept at one output step t_p and zero elsewhere, so each norm is that of the
    gradient arriving at output step t_p, carried back to input step s. No loss and no head are
    differentiated: the cotangents are given. The same conditions as `plan` apply (a fused,
    unidirectional module on a (B, T, I) / (T, B, I) tensor); the caller checks them.
    Training-mode inter-layer dropout needs `trace`, the replay that redrew the kernel's masks
    (`replay(..., rng_state=)`); given without dropout, it spares the sweep a replay.

    Args:
        module: the fused module; x (its own layout) and hx: what it was given.
        output: (B, T, Ho) or (T, B, Ho), what it returned for x (a one-layer module's sweep
            reads its states from it).
        cotangents: (P, *output.shape) the output cotangents, one per position.
        samples: measure only the first `samples` samples (all with None). Samples do not
            interact in the recurrence, so the others need no sweep: the monitor replays a
            dropout module's whole batch (its masks were drawn for all of it) but keeps
            `max_batch` samples. Returns (samples, P, T) then.
    """
    spec = describe(module)
    if samples is not None:
        dim = 0 if spec.batch_first else 1
        x, output = x.narrow(dim, 0, samples), output.narrow(dim, 0, samples)
        cotangents = cotangents.narrow(dim + 1, 0, samples)
        hx = narrow_state(hx, samples)
    site = SweepSite(module, x.detach(), hx, [output.detach()])
    P = cotangents.shape[0]
    onehot = cotangents.new_zeros(P, 1, 1)  # only its length P is read

    def given(_losses, _outputs, _onehot):
        return [cotangents], "given cotangents"

    norms, _ = lag_norms(site, None, onehot, given, trace=trace, samples=samples)
    return norms
