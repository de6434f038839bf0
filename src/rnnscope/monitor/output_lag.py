"""The monitor's per-lag gradient under a per-step loss: gradient arriving at output step t.

At an exact step the monitor holds the gradient g the real training loss sent to a recurrent
module's output sequence y (B, T, D·Ho), and a replay of the module on the same samples. For a
sample of output positions t (up to `MAX_POSITIONS`, evenly spaced), only output step t's
captured cotangent g_t is carried back through the replay, giving ‖∂(g_t · y_t)/∂x_s‖ for every
input step s ≤ t of the module's input. Averaged over samples and positions at each lag
k = t − s this is the per-lag row of the monitor's heatmap: "gradient arriving at output step t",
by lag.

When the loss at step t depends on y_t only (a per-step head: a language model's decoder, a
tagger's classifier), g_t = ∂L/∂y_t carries only step t's loss, and the row equals
`lag_profile`'s ‖∂ℓ_t/∂x_s‖ of that loss exactly. With a head that mixes steps (attention over
all outputs, a loss on a sum over time) it is still exactly what it says: the gradient that
arrives at output step t, carried back to earlier inputs — not the gradient of "the loss at
step t".

A loss that is not per step (gradient reaches only the last output step, or only h_n/c_n) has
no such row: its per-timestep input profile already is the lag profile (the monitor's default
heatmap).

Pairs (sample, position) whose cotangent is exactly zero (a masked or ignored target, a step
past a packed sequence's end) receive nothing and are not counted.

Paths: a fused unidirectional module on a tensor input takes the closed-form adjoint sweep of
`lag_sweep` (all positions stacked), reading the replay's layers and, in training mode, the
inter-layer dropout masks it redrew; packed sequences take batched vector-Jacobian products
through the replay's graph (`is_grads_batched`, a loop over positions if vmap cannot run
it). A bidirectional module has no lag row: its output at step t depends on later inputs too,
so a lag k = t − s ≥ 0 does not describe it; the record says so.

Shape legend: B samples, P positions, T steps, I input features, Ho output features.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .. import lag_sweep
from ..site import pad_packed

MAX_POSITIONS = 16

BIDIRECTIONAL = ("bidirectional: its output at step t depends on later inputs too, so no "
                 "per-lag row of the gradient arriving at output step t is measured")
CHAINED = ("calls chained along time (a step-wise decoder): the per-lag row of the gradient "
           "arriving at output step t is measured only within one call")


def positions(T: int, valid: torch.Tensor) -> torch.Tensor:
    """(P,) up to MAX_POSITIONS output steps, evenly spaced over 0 … T − 1, among the steps
    where some sample received gradient (`valid` (T,) bool)."""
    steps = valid.nonzero().flatten()
    if steps.numel() <= MAX_POSITIONS:
        return steps
    pick = torch.linspace(0, steps.numel() - 1, MAX_POSITIONS).round().long().unique()
    return steps[pick]


def is_per_step(g: torch.Tensor, lengths: torch.Tensor | None) -> bool:
    """Whether output gradient g (B, T, F) reaches some step before a sample's last one."""
    B, T = g.shape[:2]
    nonzero = (g != 0).flatten(2).any(-1)  # (B, T)
    last = (torch.full((B,), T - 1) if lengths is None else lengths - 1).to(g.device)
    before_last = torch.arange(T, device=g.device).unsqueeze(0) < last.unsqueeze(1)
    return bool((nonzero & before_last).any())


def lag_sums(module, spec, x_leaf, hx, trace, g_out: torch.Tensor,
             keep: int) -> tuple[torch.Tensor, torch.Tensor] | str | None:
    """Per-lag (T,) sums over (sample, position) pairs of ‖∂(g_t · y_t)/∂x_{t−k}‖ and (T,)
    pair counts, for the first `keep` samples; a reason string when no row can be measured;
    None when the loss is not per step.

    Args:
        module, spec: the fused module and its `describe`; hx: the state it was given.
        x_leaf: the replay's input (module layout, or a PackedSequence), a leaf that requires
            grad; trace: the replay's Trace, its graph alive.
        g_out: the captured output gradient, batch-major padded (B, T, D·Ho).
        keep: samples measured (the first ones; the rest of a dropout replay are not).
    """
    packed = isinstance(x_leaf, PackedSequence)
    lengths = trace.lengths
    if not is_per_step(g_out[:keep], None if lengths is None else lengths[:keep]):
        return None
    if spec.num_directions != 1:
        return BIDIRECTIONAL
    B, T = g_out.shape[:2]
    nonzero = (g_out != 0).flatten(2).any(-1)  # (B, T)
    nonzero[keep:] = False
    pos = positions(T, nonzero.any(0))
    P = pos.numel()
    if packed:
        # (P, B, T, F): each position's cotangent, zero away from its step
        cot = g_out.new_zeros((P,) + tuple(g_out.shape))
        cot[torch.arange(P), :, pos] = g_out[:, pos].transpose(0, 1)
        norms = _batched_norms(trace.output.data, x_leaf.data, _pack_each(cot, lengths),
                               lambda g: pad_packed(g, x_leaf))
    else:  # the closed-form sweep, through the replay's own layers and dropout masks, for
        # the kept samples only (a dropout module's replay holds its whole batch)
        cot = g_out.new_zeros((P, keep) + tuple(g_out.shape[1:]))  # (P, keep, T, F)
        cot[torch.arange(P), :, pos] = g_out[:keep, pos].transpose(0, 1)
        norms = lag_sweep.output_step_lag_norms(module, x_leaf, hx, trace.output,
                                                _module_layout(cot, spec), trace=trace,
                                                samples=keep)  # (keep, P, T)
    norms = norms[:keep].to("cpu", torch.float64)
    pair = nonzero[:keep, pos].cpu()  # (keep, P): the pairs that received gradient
    s = torch.arange(T)
    lag = pos.cpu().unsqueeze(1) - s.unsqueeze(0)  # (P, T): k = t − s
    ok = pair.unsqueeze(-1) & (lag >= 0).unsqueeze(0)  # (keep, P, T)
    k = lag.clamp_min(0).expand_as(norms)
    sums = torch.zeros(T, dtype=torch.float64).scatter_add_(
        0, k[ok], norms[ok])
    counts = torch.zeros(T, dtype=torch.float64).scatter_add_(
        0, k[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    return sums, counts


def _module_layout(cot: torch.Tensor, spec) -> torch.Tensor:
    """(P, B, T, F) -> the module's own layout (P, B, T, F) or (P, T, B, F)."""
    return cot if spec.batch_first else cot.transpose(1, 2)


def _pack_each(cot: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(P, B, T, F) padded -> (P, N, F) packed rows, the replay output's layout."""
    return torch.stack([pack_padded_sequence(c, lengths, batch_first=True,
                                             enforce_sorted=False).data for c in cot])


def _batched_norms(out: torch.Tensor, x: torch.Tensor, cot: torch.Tensor,
                   batch_major) -> torch.Tensor:
    """(B, P, T) norms of the input gradients of P output cotangents through the replay's
    graph: one vmapped backward, or a loop over positions where vmap cannot run it."""
    try:
        grads = torch.autograd.grad(out, x, grad_outputs=cot.to(out.dtype),
                                    is_grads_batched=True, retain_graph=True)[0]
    except RuntimeError as e:
        if not any(w in str(e).lower() for w in ("vmap", "batched", "batching")):
            raise
        grads = torch.stack([torch.autograd.grad(out, x, grad_outputs=c.to(out.dtype),
                                                 retain_graph=True)[0] for c in cot])
    per = [batch_major(g).detach().to(torch.float64).norm(dim=-1) for g in grads]  # (B, T) each
    return torch.stack(per, dim=1)
