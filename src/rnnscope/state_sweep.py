"""Total state gradients of given output cotangents by one closed-form backward sweep.

`trace_state_gradients` takes ∂L/∂h_t and ∂L/∂c_t by autograd through a replay's graph. When the
cotangents the loss sends to the module's returned tensors (output, h_n, c_n) are known — the
training-time monitor captures them — the same numbers come from a backward sweep over time with
each cell's closed-form one-step VJP (`step_vjp`, cells/__init__.py) on a replay made without a
graph: no graph is recorded, and no autograd node runs per step.

Per layer (top first) and direction, in processing order n = T−1 … 0:

    dh_n = g_n + r_n            g_n the layer's output cotangent at that step, r_n what step n + 1
                                sent back (r_{T−1}: the h_n cotangent)
    LSTM: dc_n^tot = dc_n + (dh_n [W_hr]) ⊙ o_n (1 − tanh² c_n)   (h_n moving with c_n), with
          dc_{T−1} the c_n cotangent — what autograd gives for the c_t tensor
    (r_{n−1}, dc_{n−1}), d_in_n = step_vjp(dh_n, dc_n)

and the layer's input gradient d_in W_ih, through the layer below's dropout mask (the replay
redrew it), is that layer's output cotangent. Both directions of a bidirectional layer add
theirs. Packed inputs are not swept (the monitor keeps the graph there).

Shape legend: B samples, T steps, H hidden units, Ho the layer's output size (the projection
size with proj_size > 0), G gates, L layers, D directions.
"""

from __future__ import annotations

import torch

from .cells import CELLS
from .checks import count_nonfinite
from .profile import per_sample_loss
from .results import StateGradientLayer, StateGradients


def can_sweep(trace) -> bool:
    """Whether `sweep_state_gradients` takes this trace: a fused module's, unpacked, batched."""
    return not trace.spec.is_cell and trace.lengths is None and not trace.unbatched


@torch.no_grad()
def sweep_state_gradients(trace, g_out: torch.Tensor | None, g_hn: torch.Tensor | None = None,
                          g_cn: torch.Tensor | None = None, *, samples: int | None = None,
                          loss: str = "custom", keep: str = "norms", input_grad: bool = False):
    """The norms `trace_state_gradients(trace, [output, h_n, c_n], [g_out, g_hn, g_cn])` gives,
    from a sweep (the trace may have no graph).

    Args:
        trace: a `replay` of a fused module on an unpacked, batched input (`can_sweep`).
        g_out: (B, T, D·Ho) batch-major cotangent of the output sequence, or None.
        g_hn, g_cn: (L·D, B, Ho) and (L·D, B, H) cotangents of the final states, or None.
        samples: sweep only the first `samples` samples of the trace (samples do not
            interact); the cotangents are for those samples. None: all.
        loss: the name the result carries.
        keep: "norms", or "full" to keep the gradient tensors too (as `state_gradients`).
        input_grad: also return the gradient at the module's input, (samples, T, I)
            batch-major, from the same sweep (one more GEMM).

    Returns:
        `StateGradients` with (samples, T) norms per layer and direction, position order;
        with input_grad, (StateGradients, the input gradient).
    """
    if not can_sweep(trace):
        raise ValueError("sweep_state_gradients takes a fused module's replay on an unpacked, "
                         "batched input; use trace_state_gradients")
    spec = trace.spec
    cell = CELLS[spec.kind]
    L, D = spec.num_layers, spec.num_directions
    first = trace.layers[0][0].h
    B = first.shape[0] if samples is None else samples
    T, dt, dev = first.shape[1], first.dtype, first.device
    n = slice(B)
    cot = None if g_out is None else g_out.to(dev, dt)  # the layer's output cotangent
    layers = [None] * L
    for layer in reversed(range(L)):
        row, below = [], None
        for d in range(D):
            lt = trace.layers[layer][d]
            Ho = lt.h.shape[-1]
            g = None if cot is None else cot[..., d * Ho:(d + 1) * Ho]  # (B, T, Ho) positions
            if g is not None and lt.reverse:
                g = g.flip(1)  # processing order
            k = layer * D + d
            hn = None if g_hn is None else g_hn[k].to(dev, dt)
            cn = None if g_cn is None else g_cn[k].to(dev, dt)
            gh, gc, d_in = _sweep_direction(cell, spec, layer, d, lt, n, T, g, hn, cn,
                                            want_input=layer > 0 or input_grad)
            row.append(gradient_layer(gh, gc, lt.reverse, keep))
            if d_in is not None:  # (T, B, G·H) processing order -> (B, T, I_l) positions
                w_ih = spec.params(layer, d).w_ih.detach()
                dx = (d_in @ w_ih).transpose(0, 1)
                dx = dx.flip(1) if lt.reverse else dx
                below = dx if below is None else below + dx
        layers[layer] = tuple(row)
        if layer > 0:
            masks = trace.dropout_masks
            cot = below if not masks else below * masks[layer - 1][n].to(dt)
    sg = StateGradients(tuple(layers), loss)
    return (sg, below) if input_grad else sg


def top_sequence(trace) -> torch.Tensor:
    """(B, T, D·Ho) the top layer's output sequence, both directions joined: what the losses of
    `state_gradients` are taken on."""
    top = trace.layers[-1]
    return top[0].h if len(top) == 1 else torch.cat([t.h for t in top], -1)


def swept_state_gradients_from_loss(trace, *, loss, keep: str = "norms",
                                    loss_name: str = "custom") -> StateGradients:
    """`state_gradients` of a sweepable trace: the loss ("last", "all" or a callable, as
    `per_sample_loss` takes it) on the top layer's output sequence is differentiated by
    autograd on that sequence alone (a leaf), and the recurrence by the sweep."""
    seq = top_sequence(trace).detach().requires_grad_(True)
    with torch.enable_grad():
        losses = per_sample_loss(seq, loss, seq.shape[0])
        (g,) = torch.autograd.grad(losses.sum(), [seq], allow_unused=True)
    return sweep_state_gradients(trace, torch.zeros_like(seq) if g is None else g,
                                 loss=loss_name, keep=keep)


def gradient_layer(gh, gc, reverse, keep, valid: torch.Tensor | None = None
                   ) -> StateGradientLayer:
    """Per-step gradients in processing order -> (B, T) norms in position order.

    valid (B, T) bool, position order (a packed batch's `LayerTrace.valid`): positions past a
    sequence's end are not steps of it — the tensor there is the carried state, whose gradient
    is that of the state it carries — so they are reported as 0, as `gradient_profile` does."""

    def stack(gs):
        out = torch.stack(gs[::-1] if reverse else gs, dim=1).detach()  # (B, T, ·)
        if valid is not None:
            out = out.masked_fill(~valid.to(out.device).unsqueeze(-1), 0)
        return out

    h = stack(gh)
    c = stack(gc) if gc is not None else None
    norm = lambda t: t.to("cpu", torch.float64).norm(dim=-1)  # noqa: E731
    h_norm, c_norm = norm(h), (norm(c) if c is not None else None)
    # a NaN/Inf value makes its norm non-finite: count values only when some norm is
    bad = sum(count_nonfinite(t) for t, n in ((h, h_norm), (c, c_norm))
              if n is not None and not torch.isfinite(n).all())
    return StateGradientLayer(h=h_norm, c=c_norm, h_full=h.cpu() if keep == "full" else None,
                              c_full=c.cpu() if c is not None and keep == "full" else None,
                              nonfinite=bad)


def _sweep_direction(cell, spec, layer: int, d: int, lt, n: slice, T: int, g, hn, cn, *,
                     want_input: bool):
    """One layer/direction: per processing step, the total ∂/∂h_t and (LSTM) ∂/∂c_t (lists of
    (B, ·) tensors, processing order) and, if wanted, the input projection cotangents
    (T, B, G·H)."""
    p = spec.params(layer, d)
    w = cell.vjp_weights(p)
    saved = cell.vjp_saved_from_trace(p, lt, nonlinearity=spec.nonlinearity)
    per_step = [type(saved)(*fields) for fields in zip(*(t[n].unbind(1) for t in saved))]
    h = lt.h[n]
    B, Ho = h.shape[0], h.shape[-1]
    lstm = spec.kind == "lstm"
    rec = h.new_zeros(B, Ho) if hn is None else hn.clone()
    dc = None
    if lstm:
        H = lt.c0.shape[-1]
        dc = h.new_zeros(B, H) if cn is None else cn.clone()
        dc_tot = h.new_empty(T, B, H)
    dh_all = h.new_empty(T, B, Ho)
    d_ins = None
    for s in range(T - 1, -1, -1):
        dh = dh_all[s]
        if g is None:
            dh.copy_(rec)
        else:
            torch.add(g[:, s], rec, out=dh)
        if lstm:
            (rec, dc), d_in = cell.step_vjp(w, per_step[s], (dh, dc), dc_total=dc_tot[s])
        else:
            (rec,), d_in = cell.step_vjp(w, per_step[s], (dh,))
        if want_input:
            if d_ins is None:
                d_ins = d_in.new_empty((T,) + tuple(d_in.shape))
            d_ins[s] = d_in
    return list(dh_all.unbind(0)), (list(dc_tot.unbind(0)) if lstm else None), d_ins
