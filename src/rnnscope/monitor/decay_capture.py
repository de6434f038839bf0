"""The monitor on decay recurrences (MinGRU, MinLSTM, LRU, RGLRU, SelectiveSSM, SLSTM and any
module implementing `rnnscope.modern.protocol`): hooks, and the exact step from the protocol.

Cheap (hooks, no extra forward): the per-step gradient at the layer's input (the same
`input_grad` statistic as for nn.LSTM) and at its outputs (`output_grad`), and the gradient
norm of each of its parameters (`param_norms`, one block per parameter: these modules have no
gate blocks in their weights).

Exact (every `replay_every` steps, on the first `max_batch` samples): the true ∂L/∂h_t of the
training loss, from the gradient the real backward sent to the outputs and to h_n:

    direct_t = ∂(g_y · y)/∂h_t       y = readout(x, h) (the protocol's; y = h flattened without)
    linear in h:  g_t = direct_t + conj(a_{t+1}) ⊙ g_{t+1}        (one reverse linear scan)
    otherwise:    s_t = direct_t + A_{t+1}ᴴ s_{t+1} on the full running state (step_jacobians)

with g_{T−1} also receiving the gradient of h_n (the last state). The decay statistics take the
place of the gate statistics (`gates`, gate "|a|"): per unit the mean |a_t| over the replayed
steps, the fractions of units above / below the alert policy's saturation thresholds (|a| near
1: memory that does not fade; near 0: none), the median memory time 1/(1 − mean |a|) and the
histogram of |a| over [0, 1] (values above 1, possible for a protocol module, fall outside the
histogram and count in the mean and the fractions). What cannot be given for these modules is
said in the record (never silently missing): the per-lag output row of a per-step loss is an
`output_lag_grad` entry with no row and a note saying why.

Shape legend: B samples, T steps, I input, O output width, S one sample's state shape,
N = prod(S), M the full running state's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..modern.analyses import _full_steps, batch_major, decays
from ..modern.protocol import DecaySpec
from ..modern.scan import linear_scan
from .capture import Call, _first_samples, chain_shares

# why the per-lag row is absent for a decay recurrence (the OutputLagRow's note)
NO_OUTPUT_LAG = ("per-lag output row (output_lag_grad) not measured for decay recurrences; "
                 "use rnnscope.lag_profile on the module")


@dataclass
class DecayCall(Call):
    """One call of a decay recurrence: a fused-module Call, plus the cheap output gradient
    (B, T, O) batch-major, summed over backwards."""

    output_grad: torch.Tensor | None = None
    out_ids: tuple = field(default_factory=tuple)


def make_hooks(mon, name: str, dspec: DecaySpec):
    """(forward pre-hook, forward hook) for decay recurrence `name` of monitor `mon`."""
    from .monitor import _in_recomputation, _state_tensors

    batch_dim = 0 if dspec.batch_first else 1

    def pre_hook(module, args, kwargs):
        cheap, exact = mon._active()
        if not (cheap or exact) or not torch.is_grad_enabled():
            return None
        cap = mon._caps[name]
        key = "x" if "x" in kwargs else "input"
        x = args[0] if args else kwargs.get(key)
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            cap.skipped = "unbatched inputs are not measured"
            return None
        changed = not x.requires_grad
        if changed:  # a fresh leaf with the same values, so that ∂L/∂x reaches a hook
            x = x.detach().requires_grad_(True)
        replaced = ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, key: x})
        if _in_recomputation():
            return replaced if changed else None
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        prev = cap.calls[-1] if cap.calls else None
        call = DecayCall()
        call.state_in = tuple(id(t) for t in _state_tensors(hx))
        call.head = not (prev is not None and call.state_in and call.state_in == prev.state_out)
        cap.calls.append(call)
        if cheap:
            cap.tensor_handles.append(x.register_hook(mon._counted(
                mon._input_grad_hook(call, None, batch_dim))))
        if exact:
            call.n = min(mon.max_batch, x.shape[batch_dim])
            call.x = _first_samples(x, call.n, batch_dim)
            call.hx = _narrow(hx, call.n)
        return replaced if changed else None

    def hook(module, args, kwargs, output):
        cheap, exact = mon._active()
        if not (cheap or exact) or not torch.is_grad_enabled() or _in_recomputation():
            return None
        cap = mon._caps[name]
        if not cap.calls:
            return None
        call = cap.calls[-1]
        if not (isinstance(output, tuple) and len(output) == 2
                and isinstance(output[0], torch.Tensor)):
            # nothing to hook the output gradient on: said, never zeros
            call.x = None
            cap.skipped = (f"{type(module).__name__}.forward returned "
                           f"{type(output).__name__}, not (output, h_n) as nn.GRU does: "
                           "output_grad and the exact state gradients are not measured")
            return None
        out, hn = output
        parts = _state_tensors(hn)
        call.state_out = tuple(id(t) for t in parts)
        # h_n may be a view of the output itself (MinGRU: y = h, h_n = h[:, -1]): a hook on
        # the output then sees h_n's gradient too, which is taken out again below so that
        # output_grad is ∂L/∂y alone and h_n's gradient is counted once
        hn_grads = [None] * len(parts)
        call.grad_out["h_n"] = [None] * len(parts)
        for i, t in enumerate(parts):
            if t.requires_grad:
                def on_hn(g, i=i):
                    call.got_grad = True
                    g = g.detach()
                    hn_grads[i] = g if hn_grads[i] is None else hn_grads[i] + g
                    if exact and call.x is not None:
                        g = g.narrow(1, 0, call.n).clone()  # (1, n, *S)
                        old = call.grad_out["h_n"][i]
                        call.grad_out["h_n"][i] = g if old is None else old + g
                cap.tensor_handles.append(t.register_hook(mon._counted(on_hn)))
        views = [(i, t) for i, t in enumerate(parts) if _view_of(t, out)]
        if out.requires_grad:
            def on_out(g):
                g = g.detach()
                if views:
                    # a copy laid out as out is in memory: h_n sits in it where it sits in out
                    buf = torch.empty_strided(out.size(), out.stride(), dtype=g.dtype,
                                              device=g.device)
                    g = buf.copy_(g)
                    for i, t in views:
                        if hn_grads[i] is not None:
                            g.as_strided(t.size(), t.stride(),
                                         t.storage_offset() - out.storage_offset()).sub_(
                                             hn_grads[i])
                        hn_grads[i] = None  # taken out once per backward
                g = g if dspec.batch_first else g.transpose(0, 1)  # (B, T, O)
                call.got_grad = True
                if cheap:
                    call.output_grad = g if call.output_grad is None else call.output_grad + g
                if exact and call.x is not None:
                    g = g[:call.n].clone()
                    old = call.grad_out.get("out")
                    call.grad_out["out"] = g if old is None else old + g
            cap.tensor_handles.append(out.register_hook(mon._counted(on_out)))
        return None

    return pre_hook, hook


_VIEW_NODES = ("UnsqueezeBackward", "SelectBackward", "SliceBackward", "ViewBackward",
               "SqueezeBackward", "AsStridedBackward", "UnbindBackward", "ReshapeAlias")


def _view_of(t: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether t was taken from out by view operations only (then out's gradient includes
    t's, as one tensor's storage)."""
    fn, target = t.grad_fn, out.grad_fn
    if fn is None or target is None:
        return False
    while fn is not target:
        if not type(fn).__name__.startswith(_VIEW_NODES):
            return False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return True


def _narrow(hx, n: int):
    """The first n samples of hx ((1, B, *S) or a tuple of those), detached copies."""
    if hx is None:
        return None
    if isinstance(hx, (tuple, list)):
        return tuple(_narrow(h, n) for h in hx)
    return hx.detach().narrow(1, 0, n).clone()


@dataclass
class DecayReplayed:
    """One call of a decay recurrence, its exact state gradients from the protocol."""

    spec: DecaySpec
    call: DecayCall
    keep: int

    @cached_property
    def state_parts(self) -> dict:
        """{(0, 0): {"h": (keep, T) float64 norms of ∂L/∂h_t, "c": sLSTM's ∂L/∂c_t or None,
        "valid": (keep, T) all True, "gate": |a| (keep, T, N) float64}} on the CPU."""
        spec, call = self.spec, self.call
        m = spec.module
        k = self.keep
        x = call.x[:k] if spec.batch_first else call.x[:, :k]
        hx = _narrow(call.hx, k)
        xb, _ = batch_major(spec, x)
        B, T = xb.shape[:2]
        with torch.enable_grad():
            h = m.hidden_states(x, hx).detach().requires_grad_(True)  # (B, T, *S)
            readout = getattr(m, "readout", None)
            y = readout(xb.detach(), h) if callable(readout) else h.reshape(B, T, -1)
            g_y = call.grad_out.get("out")
            if g_y is not None:
                g_y = g_y[:k]
                (direct,) = torch.autograd.grad(y, h, grad_outputs=g_y.to(y.dtype),
                                                allow_unused=True)
            else:
                direct = None
        direct = (torch.zeros_like(h) if direct is None else direct).reshape(B, T, -1)
        g_hn = [None if g is None else g[0, :k].reshape(B, -1)
                for g in call.grad_out.get("h_n", [])]
        a = decays(spec, x, hx, B, T)  # (B, T, N) the decay; sLSTM: its forget gate
        c = None
        if spec.linear:
            if g_hn and g_hn[0] is not None:  # h_n is the last state
                direct = direct.clone()
                direct[:, T - 1] += g_hn[0].to(direct.dtype)
            nxt = torch.cat([a[:, 1:].conj(), torch.zeros_like(a[:, :1])], 1)
            g = linear_scan(nxt.flip(1), direct.flip(1)).flip(1)
        else:
            at, M = _full_steps(spec, x, hx, B, T)  # at(sl) -> (B, S, M, M), chunk by chunk
            N = direct.shape[-1]
            inj = torch.zeros(B, T, M, dtype=direct.dtype, device=direct.device)
            inj[..., :N] = direct
            off = 0  # h_n parts fill the full state in order (sLSTM: h, c, n, m)
            for gp in g_hn:
                if gp is None:
                    off += N
                    continue
                inj[:, T - 1, off:off + gp.shape[-1]] += gp.to(inj.dtype)
                off += gp.shape[-1]
            gs = [inj[:, T - 1]]
            chunk = 16  # the dense (B, S, M, M) step Jacobians are held a chunk at a time
            for stop in range(T, 1, -chunk):  # s_t = d_t + A_{t+1}ᴴ s_{t+1}, t = stop−2 .. start−1
                start = max(1, stop - chunk)
                A = at(slice(start, stop)).to(inj.dtype)  # A_start .. A_{stop−1}
                for t in range(stop - 2, start - 2, -1):
                    nxt = (A[:, t + 1 - start].mH @ gs[-1].unsqueeze(-1)).squeeze(-1)
                    gs.append(inj[:, t] + nxt)
            full = torch.stack(gs[::-1], 1)  # (B, T, M)
            g = full[..., :N]
            if spec.entry.cell_gradient is not None:
                c = spec.entry.cell_gradient(m, x, hx, full)

        def norms(t):
            return t.detach().to("cpu", torch.complex128 if t.is_complex() else
                                 torch.float64).abs().norm(dim=-1)
        return {(0, 0): {"h": norms(g), "c": None if c is None else norms(c),
                         "valid": torch.ones(B, T, dtype=torch.bool),
                         "gate": a.detach().abs().to("cpu", torch.float64)}}


def replay_chains(spec: DecaySpec, cap, max_batch: int) -> list[list[DecayReplayed]]:
    """Per chain of calls (calls passing their state on are one sequence along time), each
    call as a `DecayReplayed` on the chain's share of `max_batch` samples (in call order).
    Each call's gradients are exact on their own: the gradient captured at its h_n already
    carries what the later calls of its chain sent back."""
    return [[DecayReplayed(spec, c, m) for c in calls]
            for calls, m in chain_shares(cap, max_batch)]
