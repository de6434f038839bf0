"""What the monitor's hooks capture in one training step, and the exact replay of it.

`Call` / `Capture` hold what a recurrent submodule's hooks saw; `chains` groups the calls of a
fused module into sequences along time; `Replayed` is one call replayed on its captured samples
with the captured output gradients, the source of every exact statistic (state gradients,
retain gates, the per-lag row under a per-step loss). Nothing here logs, reduces or formats.

Shape legend: B samples, T steps, H hidden units, L layers, D directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ..checks import narrow_state
from ..jacobians import trace_state_gradients
from ..recurrent import RETAIN_GATE
from ..replay import replay, replay_leading_samples
from ..site import pad_packed
from ..state_sweep import sweep_state_gradients
from .grad_norms import row_norms, row_norms_checked


@dataclass
class Call:
    """One call of a fused recurrent submodule in the current step."""

    # cheap path: ∂L/∂x batch-major (B, T, I), summed over every backward that reached it
    # (retain_graph), and the lengths of a packed input (steps past them are not counted)
    input_grad: torch.Tensor | None = None
    input_lengths: torch.Tensor | None = None
    # exact path: inputs (first max_batch samples), initial state, RNG state for dropout, and
    # the gradients the real loss sent to the outputs
    x: object = None
    hx: object = None
    rng_state: torch.Tensor | None = None
    grad_out: dict = field(default_factory=dict)
    state_in: tuple = ()    # ids of the hx tensors it was given (to see calls chain)
    state_out: tuple = ()   # ids of the state tensors it returned
    got_grad: bool = False
    head: bool = True       # starts a chain (its state does not come from the previous call)
    n: int = 0              # samples captured for the exact replay


@dataclass
class Capture:
    """What one recurrent submodule's hooks saw during the current step."""

    skipped: str | None = None
    tensor_handles: list = field(default_factory=list)
    calls: list = field(default_factory=list)  # fused modules: one _Call per call
    # cells: per call, its step within its sequence (0 where a fresh state starts one), the
    # ids of the state it returned, and [summed gradient or None, batch size] entries
    cell_pos: list = field(default_factory=list)
    cell_prev_out: tuple = ()
    cell_input: list = field(default_factory=list)
    cell_state: dict = field(default_factory=dict)


def chains(cap: Capture) -> list[list[Call]]:
    """The calls of a fused module the backward reached this step, as chains: calls that
    each pass their state to the next (a decoder stepping one token at a time) are one
    sequence along time; chains are independent samples (micro-batches, several inputs)."""
    out = []
    for c in cap.calls:
        if not c.got_grad:
            continue
        if out and not c.head and c.state_in == out[-1][-1].state_out:
            out[-1].append(c)
        else:
            out.append([c])
    return out


@dataclass
class Replayed:
    """One call of a fused module replayed on its captured samples. `keep`: the samples
    measured (the first ones; a dropout replay of a PackedSequence runs the whole batch, whose
    masks were drawn for it). `mask_batch`: for a call with dropout narrowed to its first
    samples, the batch its masks were drawn for (`replay_leading_samples`).

    `swept`: an unpacked, batched call is replayed without a graph, its statistics taken by
    closed-form sweeps (`state_sweep`, `lag_sweep`); a packed call's replay records its graph
    and keeps it alive for the statistics that differentiate it."""

    module: torch.nn.Module
    spec: object
    call: Call
    keep: int
    mask_batch: int | None = None
    x: object = None        # the replay's input (a leaf that requires grad unless swept)
    trace: object = None

    @property
    def swept(self) -> bool:
        """An unpacked, batched call: its statistics all come from closed-form sweeps over the
        replay (`state_sweep`, `lag_sweep`), so no graph is recorded for them."""
        x = self.call.x
        return not isinstance(x, PackedSequence) and x.dim() == 3

    def __post_init__(self):
        x = self.call.x
        with torch.set_grad_enabled(not self.swept):
            if isinstance(x, PackedSequence):
                x = PackedSequence(x.data.detach().requires_grad_(True), x.batch_sizes,
                                   x.sorted_indices, x.unsorted_indices)
            else:
                x = x.detach().requires_grad_(not self.swept)
            self.x = x
            if self.mask_batch is not None:
                self.trace = replay_leading_samples(self.module, x, self.call.hx,
                                                    rng_state=self.call.rng_state,
                                                    batch=self.mask_batch)
            else:
                self.trace = replay(self.module, x, self.call.hx, rng_state=self.call.rng_state)

    @property
    def lengths(self):
        return _lengths(self.call.x) if isinstance(self.call.x, PackedSequence) else None

    @property
    def output_grad(self) -> torch.Tensor | None:
        """(B, T, D·Ho) batch-major gradient the real loss sent to the output sequence (zeros
        past a packed sequence's end), or None."""
        g = self.call.grad_out.get("out")
        if g is not None and not (self.spec.batch_first or
                                  isinstance(self.call.x, PackedSequence)):
            g = g.transpose(0, 1)
        return g

    @cached_property
    def state_parts(self) -> dict:
        """Per (layer, direction): (keep, T) norms of ∂L/∂h_t and ∂L/∂c_t of the captured output
        gradients back-propagated through the replay, the valid-step mask and the retain gate
        (keep, T, H), on the CPU in float64. A packed call's replay is differentiated by
        autograd (its graph is kept for the lag rows); any other's is swept in closed form."""
        tr, lengths = self.trace, self.lengths
        if self.swept:
            grads = self.call.grad_out
            sg = sweep_state_gradients(tr, self.output_grad, grads.get("h_n"), grads.get("c_n"))
        else:
            sg = self._autograd_state_gradients()
        out = {}
        m = self.keep
        for layer, dirs in enumerate(tr.layers):
            for d, lt in enumerate(dirs):
                g = sg.layers[layer][d]
                B, T = g.h.shape
                valid = (torch.ones(B, T, dtype=torch.bool) if lengths is None else
                         torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1))
                gate = None
                if self.spec.kind in RETAIN_GATE:
                    gate = lt.gates[RETAIN_GATE[self.spec.kind]].detach().to("cpu",
                                                                             torch.float64)
                out[(layer, d)] = {"h": g.h[:m], "c": None if g.c is None else g.c[:m],
                                   "valid": valid[:m], "gate": None if gate is None else gate[:m]}
        return out

    def _autograd_state_gradients(self):
        tr, lengths = self.trace, self.lengths
        outs, gouts = [], []
        for key, t in (("out", tr.output), ("h_n", tr.h_n), ("c_n", tr.c_n)):
            g = self.call.grad_out.get(key)
            if t is None or g is None:
                continue
            if isinstance(t, PackedSequence):  # padded (n, T, ·) -> the replay's packed rows
                g = pack_padded_sequence(g, lengths, batch_first=True,
                                         enforce_sorted=False).data
                t = t.data
            outs.append(t)
            gouts.append(g.to(t.dtype))
        return trace_state_gradients(tr, outs, gouts, retain_graph=True)


def replay_chains(module, spec, cap: Capture, max_batch: int) -> list[list[Replayed]]:
    """Every chain's calls replayed on the chain's share of `max_batch` samples (shared by the
    chains in call order).

    Raises:
        ValueError, TypeError: the replay refuses the module (cuDNN dropout, a subclass whose
            forward differs from its parent's).
    """
    batch_dim = 0 if spec.batch_first else 1
    return [[_replayed(module, spec, c, m, batch_dim) for c in calls]
            for calls, m in chain_shares(cap, max_batch)]


def _replayed(module, spec, c: Call, m: int, batch_dim: int) -> Replayed:
    """A call replayed on its first m samples. With dropout, the masks were drawn for the whole
    batch: a tensor input replays m samples with those masks (`replay_leading_samples`), a
    PackedSequence (masks over the whole batch's packed rows) replays the whole batch."""
    if c.rng_state is None:
        return Replayed(module, spec, narrow_call(c, m, batch_dim), m)
    if isinstance(c.x, PackedSequence):
        return Replayed(module, spec, c, m)
    return Replayed(module, spec, narrow_call(c, m, batch_dim), m, mask_batch=c.n)


def chain_shares(cap, max_batch: int) -> list[tuple[list, int]]:
    """Per chain of calls that has inputs: (its calls with inputs, m), m the samples it replays
    — the chains take `max_batch` samples between them, in call order, each at most as many as
    its smallest call has."""
    out, left = [], max_batch
    for chain in chains(cap):
        calls = [c for c in chain if c.x is not None]
        if not calls or left <= 0:
            continue
        m = min(left, min(c.n for c in calls))
        left -= m
        out.append((calls, m))
    return out


def joined_state_parts(replays: list[list[Replayed]]) -> dict:
    """Per (layer, direction): the chains' state parts, each chain's calls joined along time
    and the chains stacked as samples (padded along time to the longest, not valid there)."""
    per_key: dict = {}
    for chain in replays:
        joined: dict = {}
        for r in chain:
            for key, vals in r.state_parts.items():
                joined.setdefault(key, []).append(vals)
        for key, parts in joined.items():
            per_key.setdefault(key, []).append(
                {k: (None if parts[0][k] is None else torch.cat([p[k] for p in parts], 1))
                 for k in parts[0]})
    out = {}
    for key, ch in per_key.items():
        T = max(q["h"].shape[1] for q in ch)
        parts = [pad_time(p, T) for p in ch]
        out[key] = {k: (None if parts[0][k] is None else torch.cat([p[k] for p in parts], 0))
                    for k in parts[0]}
    return out


def narrow_call(call: Call, m: int, batch_dim: int) -> Call:
    """The call's captured inputs, state and output gradients for its first m samples."""
    if m == call.n:
        return call
    packed = isinstance(call.x, PackedSequence)
    grads = {}
    for key, g in call.grad_out.items():
        dim = (0 if packed else batch_dim) if key == "out" else 1
        grads[key] = None if g is None else g.narrow(dim, 0, m)
    return Call(x=_first_samples(call.x, m, batch_dim), hx=narrow_state(call.hx, m),
                 rng_state=call.rng_state, grad_out=grads, got_grad=call.got_grad,
                 head=call.head, n=m)


def nonfinite_values(g: torch.Tensor, norms: torch.Tensor) -> int:
    """NaN/Inf values of g, counted only when some norm is non-finite (the usual case costs
    nothing)."""
    return 0 if torch.isfinite(norms).all() else int((~torch.isfinite(g)).sum())


def input_norms(call: Call) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(T,) sum over samples of ‖∂L/∂x_t‖, (T,) samples that have step t, non-finite values."""
    g = call.input_grad
    n, finite = row_norms_checked(g)  # (B, T) float64
    bad = 0 if finite else nonfinite_values(g, n)
    if call.input_lengths is None:
        return n.sum(0), torch.full((n.shape[1],), float(n.shape[0]), dtype=torch.float64), bad
    valid = torch.arange(n.shape[1]).unsqueeze(0) < call.input_lengths.unsqueeze(1)
    return (torch.where(valid, n, torch.zeros_like(n)).sum(0), valid.sum(0).to(torch.float64),
            bad)


def pool_cell_steps(entries: list, pos: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per step within a sequence: sum over samples of the gradient norm, sample count and
    non-finite values, from per-call [gradient or None, batch] entries. A call whose tensor got
    no gradient counts as zero."""
    P = max(pos[:len(entries)]) + 1
    sums = torch.zeros(P, dtype=torch.float64)
    counts = torch.zeros(P, dtype=torch.float64)
    at = torch.as_tensor(pos[:len(entries)], dtype=torch.long)
    counts.index_add_(0, at, torch.tensor([float(B) for _, B in entries], dtype=torch.float64))
    got = [(g, p) for (g, _), p in zip(entries, pos) if g is not None]
    if not got:
        return sums, counts, 0
    gs = [g for g, _ in got]
    if all(g.shape == gs[0].shape for g in gs):  # the usual case: one stacked (calls, B, ·)
        stacked = torch.stack(gs)
        n = row_norms(stacked)  # (calls, B)
        sums.index_add_(0, torch.as_tensor([p for _, p in got], dtype=torch.long), n.sum(1))
        return sums, counts, nonfinite_values(stacked, n)
    bad = 0
    for g, p in got:
        n = row_norms(g)  # (B,)
        sums[p] += float(n.sum())
        bad += nonfinite_values(g, n)
    return sums, counts, bad


def pad_sum(rows: list) -> torch.Tensor:
    """Sum of 1-D tensors of different lengths, each padded with zeros to the longest (one
    tensor is returned as it is)."""
    if len(rows) == 1:
        return rows[0]
    out = torch.zeros(max(r.shape[0] for r in rows), dtype=torch.float64)
    for r in rows:
        out[:r.shape[0]] += r
    return out


def pad_time(part: dict, T: int) -> dict:
    """A replay part's (B, t, ·) tensors padded along time to T (padding not valid)."""
    out = {}
    for k, v in part.items():
        if v is None or v.shape[1] == T:
            out[k] = v
            continue
        pad = v.new_zeros((v.shape[0], T - v.shape[1]) + tuple(v.shape[2:]))
        out[k] = torch.cat([v, pad], 1)
    return out


def _batch_size(x, batch_dim: int) -> int:
    if isinstance(x, PackedSequence):
        return int(x.batch_sizes[0])
    return x.shape[batch_dim]


def _lengths(p: PackedSequence) -> torch.Tensor:
    from ..site import _packed_lengths

    return _packed_lengths(p)


def _first_samples(x, n: int, batch_dim: int):
    """The first n samples (original batch order), detached copies; a PackedSequence is
    re-packed from them."""
    if isinstance(x, PackedSequence):
        padded = pad_packed(x.data.detach(), x)[:n].clone()
        return pack_padded_sequence(padded, _lengths(x)[:n], batch_first=True,
                                    enforce_sorted=False)
    return x.detach().narrow(batch_dim, 0, n).clone()
