"""GradientMonitor: gradient flow through time, measured during training at a cost one can leave on.

Usage:

    with GradientMonitor(model, loggers="runs/exp1") as mon:
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            mon.step()            # after backward, before optimizer.step() / zero_grad()
            optimizer.step()

Every `every` steps (cheap: hooks, no extra forward), per recurrent submodule: the per-timestep
mean ‖∂L/∂x_t‖ at its input, gradient norms of weight_ih / weight_hh / biases per gate block
(LSTM i, f, g, o; GRU r, z, n), the global gradient norm and non-finite counts per parameter.
Every `replay_every` steps (exact): the gradient arriving at the layer's outputs is captured,
the layer is replayed on up to `max_batch` samples of the batch it saw, and that same output
gradient is back-propagated through the replay — the true ∂L/∂h_t, ∂L/∂c_t of the real training
loss for every layer and direction — plus forget/retain-gate statistics. Cells (nn.LSTMCell ...)
called step by step give those exact state gradients directly from hooks on their outputs.
Under a per-step loss (gradient reaches output steps before the last), the exact steps also
give a per-lag row: for up to 16 evenly spaced output steps t, the captured gradient arriving
at output step t alone, carried back through the replay, ‖∂(g_t·y_t)/∂x_{t−k}‖ averaged by
lag k (`output_lag`; equal to lag_profile's ‖∂ℓ_t/∂x_{t−k}‖ when the loss at step t depends on
y_t only). It is the heatmap `plot-log` draws for such runs.

The model is never changed: outputs and parameter gradients are bit-identical with and without
the monitor (the input hook only makes a data tensor that did not require grad into a fresh leaf
that does, with the same values), module hooks are held as handles and removed on detach — also
when the training step raises — and nothing of the model's is kept between steps but CPU floats.
Calls of a submodule that pass their state on (a decoder stepping one token at a time, a cell
in a loop) are joined along time; independent calls in one step (the micro-batches of gradient
accumulation, a module applied to several inputs) are pooled as more samples, since the
gradient of the step's total loss with respect to each call's input is that call's own. A second
backward through the same graph (retain_graph=True) adds to the gradients, as it adds to .grad:
every statistic describes the summed gradient the optimizer will see. The exact replay takes at
most `max_batch` samples over all independent calls.

Under torch.distributed every statistic is declared with its reduction (sum or max) and reduced
across ranks (`stats.StatSet`); input and state gradients are taken as gradients of the global
objective DDP optimises (each rank's loss / world size), so the reduced per-lag figures equal
those of one process on the concatenated batch. Rank 0 logs.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ..checks import narrow_state
from ..site import pad_packed
from ..recurrent import GATES, RETAIN_GATE, describe, is_recurrent
from ..jacobians import trace_state_gradients
from ..replay import replay
from .alerts import AlertPolicy, AlertState, GradientFlowWarning
from . import output_lag
from .loggers import make_loggers
from .schedules import PRESETS, as_schedule
from .stats import StatSet

GATE_BINS = 20


@dataclass
class _Call:
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
class _Capture:
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


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GradientMonitor:
    """Training-time gradient-flow monitor. See the module docstring for what it measures.

    Args:
        model: the model being trained; every nn.RNN/LSTM/GRU and cell inside is monitored.
        every: cheap statistics schedule (int n: every n steps; or a callable step -> bool).
        replay_every: exact replay schedule (same forms; 0 or None: never).
        max_batch: samples replayed at exact steps (the first ones, over all the step's
            micro-batches; a training-mode module with inter-layer dropout is replayed whole,
            since its masks were drawn for the whole batch, and its first samples kept).
        loggers: a Logger, a directory / *.jsonl / *.csv path, or a list of those.
        alerts: an AlertPolicy (default thresholds if None).
        history: records kept in memory (`.history`, oldest dropped first).
        preset: "cheap" or "full" — sets every/replay_every (explicit arguments win).
        process_group: torch.distributed group to reduce over (default: the world).
    """

    def __init__(self, model: nn.Module, *, every=None, replay_every=None, max_batch: int = 8,
                 loggers=(), alerts: AlertPolicy | None = None, history: int = 1000,
                 preset: str = "cheap", process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        if not isinstance(max_batch, int) or max_batch <= 0:
            raise ValueError(f"max_batch must be a positive int; got {max_batch!r}")
        if not isinstance(history, int) or history <= 0:
            raise ValueError(f"history must be a positive int; got {history!r}")
        every = PRESETS[preset]["every"] if every is None else every
        replay_every = PRESETS[preset]["replay_every"] if replay_every is None else replay_every
        self.model = model
        self.schedule = as_schedule(every)
        self.replay_schedule = as_schedule(replay_every)
        self.max_batch = max_batch
        self.modules = {(name or type(m).__name__): m for name, m in model.named_modules()
                        if is_recurrent(m)}
        if not self.modules:
            raise ValueError(f"{type(model).__name__} contains no nn.RNN/LSTM/GRU or cell to "
                             "monitor")
        self.specs = {name: describe(m) for name, m in self.modules.items()}
        self.loggers = make_loggers(loggers)
        self.policy = alerts if alerts is not None else AlertPolicy()
        self._alert_state = AlertState(self.policy)
        self.history: deque = deque(maxlen=history)
        self.alerts: deque = deque(maxlen=history)
        self.process_group = process_group
        self.step_count = 0
        self._handles: list = []
        self._caps = {name: _Capture() for name in self.modules}
        self._warned: set = set()
        self._failed_loggers: set = set()  # id() of loggers paused after a failure
        self._lag_notes: dict = {}

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "GradientMonitor":
        if self.attached:
            return self
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(
                self._make_pre_hook(name), with_kwargs=True))
            self._handles.append(m.register_forward_hook(
                self._make_post_hook(name), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook (module and tensor hooks); the monitor can be attached again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._reset_captures()

    def close(self) -> None:
        """Detach and close the loggers."""
        self.detach()
        for lg in self.loggers:
            lg.close()

    def __enter__(self) -> "GradientMonitor":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    def _reset_captures(self) -> None:
        for cap in self._caps.values():
            for h in cap.tensor_handles:
                h.remove()
        self._caps = {name: _Capture() for name in self.modules}

    # -- hooks ----------------------------------------------------------------------------------

    def _active(self) -> tuple[bool, bool]:
        s = self.step_count
        return bool(self.schedule(s)), bool(self.replay_schedule(s))

    def _make_pre_hook(self, name: str):
        spec = self.specs[name]
        batch_dim = 0 if (spec.batch_first or spec.is_cell) else 1

        def hook(module, args, kwargs):
            cheap, exact = self._active()
            if not (cheap or exact) or not torch.is_grad_enabled():
                return None
            cap = self._caps[name]
            x = args[0] if args else kwargs.get("input")
            packed = isinstance(x, PackedSequence)
            data = x.data if packed else x
            want_dim = 2 if (spec.is_cell or packed) else 3
            if not isinstance(data, torch.Tensor) or data.dim() != want_dim:
                cap.skipped = "unbatched inputs are not measured"
                return None
            # A data tensor becomes a fresh leaf with equal values, at every call, also when
            # activation checkpointing recomputes the forward: the recomputed graph must match.
            changed = not data.requires_grad
            if changed:
                data = data.detach().requires_grad_(True)
                x = (PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
                     if packed else data)
            if _in_recomputation():
                return _replace_first(args, kwargs, x) if changed else None
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            state_in = _state_tensors(hx)
            if spec.is_cell:
                # a new sequence starts where the state is fresh: none given, or one that is
                # neither the previous call's output nor computed from anything (zeros, a
                # detached state); otherwise this call is the next step of the running one
                chained = bool(cap.cell_pos) and (
                    bool({id(t) for t in state_in} & set(cap.cell_prev_out))
                    or any(t.requires_grad for t in state_in))
                cap.cell_pos.append(cap.cell_pos[-1] + 1 if chained else 0)
                if cheap:
                    entry = [None, data.shape[0]]
                    cap.cell_input.append(entry)
                    cap.tensor_handles.append(data.register_hook(_accumulate_into(entry)))
                return _replace_first(args, kwargs, x) if changed else None
            prev = cap.calls[-1] if cap.calls else None
            call = _Call()
            call.state_in = tuple(id(t) for t in state_in)
            call.head = not (prev is not None and call.state_in
                             and call.state_in == prev.state_out)
            cap.calls.append(call)
            if cheap:
                call.input_lengths = _lengths(x) if packed else None
                cap.tensor_handles.append(data.register_hook(
                    self._input_grad_hook(call, x if packed else None, batch_dim)))
            extra = len(args) > 2 or any(k not in ("input", "hx") for k in kwargs)
            if exact and extra and type(module) not in (nn.RNN, nn.LSTM, nn.GRU):
                # the subclass check probed forward(input, hx) only: what the extra arguments
                # do (e.g. lengths that pack inside forward) is unknown, so no exact replay
                cap.skipped = (f"exact replay skipped: {type(module).__name__} was called with "
                               "arguments beyond (input, hx), which the replay cannot follow")
            elif exact:
                # up to max_batch samples of every independent call (which of them reach a
                # backward is known only at step(), where the budget is shared); the next
                # step of a chain keeps the same samples as its first call
                call.n = min(self.max_batch, _batch_size(x, batch_dim)) if call.head else prev.n
                if module.training and spec.dropout > 0 and spec.num_layers > 1:
                    # the kernel drew its dropout masks for the whole batch: only a replay of
                    # the whole batch redraws the same ones (its first samples are kept)
                    call.n = _batch_size(x, batch_dim)
            if call.n > 0:
                n = call.n
                call.x = _first_samples(x, n, batch_dim)
                call.hx = narrow_state(hx, n, clone=True)
                if module.training and spec.dropout > 0 and spec.num_layers > 1:
                    call.rng_state = torch.get_rng_state()
            return _replace_first(args, kwargs, x) if changed else None

        return hook

    @staticmethod
    def _input_grad_hook(call: _Call, packed_like, batch_dim: int):
        def on_grad(g):
            g = g.detach()
            if packed_like is not None:  # (N, I) packed rows -> (B, T, I) padded, zeros past ends
                g = pad_packed(g, packed_like)
            elif batch_dim != 0:
                g = g.transpose(0, 1)
            # a second backward through the same graph (retain_graph=True) adds to .grad: the
            # statistics describe that sum, so add here too
            call.input_grad = g if call.input_grad is None else call.input_grad + g
            call.got_grad = True
            return None

        return on_grad

    def _make_post_hook(self, name: str):
        spec = self.specs[name]
        batch_dim = 0 if (spec.batch_first or spec.is_cell) else 1

        def hook(module, args, kwargs, output):
            cheap, exact = self._active()
            if not (cheap or exact) or not torch.is_grad_enabled() or _in_recomputation():
                return None
            cap = self._caps[name]
            if spec.is_cell:  # exact state gradients straight from the returned state
                states = output if isinstance(output, tuple) else (output,)
                cap.cell_prev_out = tuple(id(t) for t in states if isinstance(t, torch.Tensor))
                if not exact:
                    return None
                for key, s in zip(("h", "c"), states):
                    entry = [None, s.shape[0]]
                    cap.cell_state.setdefault(key, []).append(entry)
                    if isinstance(s, torch.Tensor) and s.requires_grad:
                        cap.tensor_handles.append(s.register_hook(_accumulate_into(entry)))
                return None
            if not cap.calls:
                return None
            call = cap.calls[-1]
            out, hn = output
            call.state_out = tuple(id(t) for t in _state_tensors(hn))
            if not exact or call.x is None:
                return None
            n = _batch_size(call.x, batch_dim)
            pieces = {"out": (out, batch_dim)}
            if isinstance(hn, tuple):
                pieces["h_n"], pieces["c_n"] = (hn[0], 1), (hn[1], 1)
            else:
                pieces["h_n"] = (hn, 1)
            for key, (t, dim) in pieces.items():
                call.grad_out[key] = None  # stays None if no gradient reaches it
                data = t.data if isinstance(t, PackedSequence) else t
                if isinstance(data, torch.Tensor) and data.requires_grad:
                    def grab(g, key=key, dim=dim, t=t):
                        call.got_grad = True
                        if isinstance(t, PackedSequence):  # rows of the first n samples
                            g = _packed_rows(g.detach(), t, n)
                        else:
                            g = g.detach().narrow(dim, 0, n).clone()
                        old = call.grad_out[key]  # a second backward (retain_graph) adds
                        call.grad_out[key] = g if old is None else old + g
                    cap.tensor_handles.append(data.register_hook(grab))
            return None

        return hook

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> dict | None:
        """Close the current training step: compute, reduce, alert, log. Returns its record
        (None on steps the schedules skip). Call after backward, before optimizer.step()."""
        cheap, exact = self._active()
        record = None
        if (cheap or exact) and self._forward_without_backward():
            self._reset_captures()
            if "no-backward" not in self._warned:
                self._warned.add("no-backward")
                warnings.warn("rnnscope monitor: step() was called after a forward with no "
                              "backward (a validation pass?); no record was made for it",
                              GradientFlowWarning, stacklevel=2)
            return None
        try:
            if cheap or exact:
                record = self._measure(cheap, exact)
        finally:
            self._reset_captures()
            self.step_count += 1
        return record

    def _forward_without_backward(self) -> bool:
        """The monitored modules ran in this step but no gradient reached any of them."""
        if _world()[1] > 1:  # every rank must take part in the reductions
            return False
        ran = got = False
        for cap in self._caps.values():
            ran |= bool(cap.calls) or bool(cap.cell_input) or bool(cap.cell_state)
            got |= any(c.got_grad for c in cap.calls)
            got |= any(e[0] is not None for e in cap.cell_input)
            got |= any(e[0] is not None for es in cap.cell_state.values() for e in es)
        return ran and not got

    @staticmethod
    def _chains(cap: _Capture) -> list[list[_Call]]:
        """The calls of a fused module the backward reached this step, as chains: calls that
        each pass their state to the next (a decoder stepping one token at a time) are one
        sequence along time; chains are independent samples (micro-batches, several inputs)."""
        chains = []
        for c in cap.calls:
            if not c.got_grad:
                continue
            if chains and not c.head and c.state_in == chains[-1][-1].state_out:
                chains[-1].append(c)
            else:
                chains.append([c])
        return chains

    def _measure(self, cheap: bool, exact: bool) -> dict:
        rank, world = _world()
        stats = StatSet()
        skipped = {}
        self._lag_notes = {}  # layer -> why its per-lag row is missing at this step
        if cheap:
            self._param_stats(stats)
        for name, cap in self._caps.items():
            if cap.skipped:
                skipped[name] = cap.skipped
            if cheap:
                self._input_stats(stats, name, cap, world)
            if exact:
                reason = self._exact_stats(stats, name, cap, world)
                if reason:
                    skipped[name] = reason
        stats.sync(self.process_group)
        record = self._record(stats, exact)
        if skipped:
            record["skipped"] = skipped
            for name, why in skipped.items():
                if (name, why) not in self._warned:
                    self._warned.add((name, why))
                    warnings.warn(f"rnnscope monitor: {name}: {why}", GradientFlowWarning,
                                  stacklevel=3)
        alerts = self._alert_state.check(record["step"], record)
        for a in alerts:
            self.alerts.append(a)
            if self.policy.warn:
                warnings.warn(a.message, GradientFlowWarning, stacklevel=3)
            if self.policy.callback is not None:
                self.policy.callback(a)
        if rank == 0:
            for lg in self.loggers:
                self._write(lg, record, alerts)
        self.history.append(record)
        return record

    def _write(self, lg, record: dict, alerts: list) -> None:
        """Hand a record to one logger. A logger that fails (a full disk, a user's logger
        raising) never takes the training loop down: one warning, then that logger is paused."""
        if id(lg) in self._failed_loggers:
            return
        try:
            lg.log(record)
            for a in alerts:
                lg.log_alert(a)
        except Exception as e:  # noqa: BLE001 - any logger failure is reported, not raised
            self._failed_loggers.add(id(lg))
            warnings.warn(f"rnnscope monitor: {type(lg).__name__} failed at step "
                          f"{record.get('step')} ({type(e).__name__}: {e}); it is paused for "
                          "the rest of this run, training goes on", GradientFlowWarning,
                          stacklevel=4)

    def _param_stats(self, stats: StatSet) -> None:
        names, grads = [], []
        for n, p in self.model.named_parameters():
            if p.grad is not None:
                names.append(n)
                grads.append(p.grad.detach())
        if not grads:
            return
        norms = torch.stack([g.norm() for g in grads]).to(torch.float64)
        stats.add("global_norm", norms.pow(2).sum().sqrt().cpu(), "max")
        # a NaN/Inf value makes its parameter's norm non-finite: count values only there
        for i in (~torch.isfinite(norms)).nonzero().flatten().tolist():
            stats.add(f"nonfinite_params/{names[i]}", int((~torch.isfinite(grads[i])).sum()),
                      "max")
        for mname, m in self.modules.items():
            spec = self.specs[mname]
            G = len(GATES[spec.kind]) or 1
            for pname, p in m.named_parameters(recurse=False):
                if p.grad is None or pname.startswith("weight_hr"):
                    if p.grad is not None:
                        stats.add(f"param/{mname}/{pname}", p.grad.norm().cpu(), "max")
                    continue
                blocks = p.grad.detach().reshape(G, spec.hidden_size, -1)
                norms_b = blocks.to(torch.float64).norm(dim=(1, 2)).cpu()
                labels = GATES[spec.kind] or ("",)
                for lab, v in zip(labels, norms_b):
                    stats.add(f"param/{mname}/{pname}" + (f".{lab}" if lab else ""), v, "max")

    def _input_stats(self, stats, name, cap, world) -> None:
        if cap.cell_input:  # cells: entries per call, pooled by step within each sequence
            if not any(e[0] is not None for e in cap.cell_input):
                return
            sums, counts, bad = _pool_cell_steps(cap.cell_input, cap.cell_pos)
        else:
            rows = []  # per chain: (sum over samples, count) per step, joined along time
            bad = 0
            for chain in self._chains(cap):
                parts = [_input_norms(c) for c in chain if c.input_grad is not None]
                if parts:
                    rows.append((torch.cat([p[0] for p in parts]),
                                 torch.cat([p[1] for p in parts])))
                    bad += sum(p[2] for p in parts)
            if not rows:
                return
            sums = _pad_sum([r[0] for r in rows])
            counts = _pad_sum([r[1] for r in rows])
        stats.add(f"input_sum/{name}", sums / world, "sum")
        stats.add(f"input_count/{name}", counts, "sum")
        if bad:
            stats.add(f"input_nonfinite/{name}", float(bad), "sum")

    def _exact_stats(self, stats, name, cap, world) -> str | None:
        spec = self.specs[name]
        if spec.is_cell:
            count = None
            for key, entries in cap.cell_state.items():
                if not any(e[0] is not None for e in entries):
                    continue
                sums, counts, _ = _pool_cell_steps(entries, cap.cell_pos)
                stats.add(f"state_sum/{name}/l0d0/{key}", sums / world, "sum")
                count = counts
            if count is not None:
                stats.add(f"state_count/{name}/l0d0", count, "sum")
            return None
        per_key = {}  # key -> per chain, the call parts joined along time
        lags = []  # per call: (sums, counts) of the per-lag row, or why there is none
        left = self.max_batch  # samples to replay, shared by the chains in call order
        batch_dim = 0 if spec.batch_first else 1
        for chain in self._chains(cap):
            calls = [c for c in chain if c.x is not None]
            if not calls or left <= 0:
                continue
            m = min(left, min(c.n for c in calls))
            left -= m
            joined = {}
            for call in calls:
                try:
                    if call.rng_state is None:
                        part, lag = self._replay_call(name, _narrow_call(call, m, batch_dim), m)
                    else:  # dropout: replay the whole batch, keep the first m samples
                        part, lag = self._replay_call(name, call, m)
                        part = {key: {k: (None if v is None else v[:m]) for k, v in d.items()}
                                for key, d in part.items()}
                except (ValueError, TypeError) as e:  # e.g. cuDNN dropout, a refused subclass
                    return f"exact replay skipped: {e}"
                if lag is not None:
                    lags.append(lag if len(calls) == 1 or isinstance(lag, str)
                                else output_lag.CHAINED)
                for key, vals in part.items():
                    joined.setdefault(key, []).append(vals)
            for key, parts in joined.items():
                per_key.setdefault(key, []).append(
                    {k: (None if parts[0][k] is None else torch.cat([p[k] for p in parts], 1))
                     for k in parts[0]})
        for key, chains in per_key.items():
            # chains are more samples: pad each to the longest along time (not valid there)
            parts = [_pad_time(p, max(q["h"].shape[1] for q in chains)) for p in chains]
            h = torch.cat([p["h"] for p in parts], dim=0)       # (B, T) over all chains
            valid = torch.cat([p["valid"] for p in parts], dim=0)
            stats.add(f"state_sum/{name}/{key}/h", torch.where(valid, h, 0.0).sum(0) / world,
                      "sum")
            if parts[0]["c"] is not None:
                c = torch.cat([p["c"] for p in parts], dim=0)
                stats.add(f"state_sum/{name}/{key}/c",
                          torch.where(valid, c, 0.0).sum(0) / world, "sum")
            stats.add(f"state_count/{name}/{key}", valid.sum(0).to(torch.float64), "sum")
            if parts[0]["gate"] is not None:
                gate = torch.cat([p["gate"] for p in parts], dim=0)  # (B, T, H)
                g = gate[valid]  # (N, H) valid steps only
                stats.add(f"gate_sum/{name}/{key}", g.sum(0), "sum")
                stats.add(f"gate_count/{name}/{key}", float(g.shape[0]), "sum")
                stats.add(f"gate_hist/{name}/{key}",
                          torch.histc(g.reshape(-1), GATE_BINS, 0.0, 1.0), "sum")
        reasons = [r for r in lags if isinstance(r, str)]
        if reasons:
            self._lag_notes[name] = reasons[0]
        elif lags:
            for sums, counts in lags:
                stats.add(f"lag_sum/{name}", sums / world, "sum")
                stats.add(f"lag_count/{name}", counts, "sum")
        return None

    def _replay_call(self, name: str, call: _Call, keep: int) -> tuple[dict, object]:
        """Back-propagate one call's captured output gradients through its replay: per layer
        and direction, (B, T) norms of ∂L/∂h_t, ∂L/∂c_t, the valid-step mask and the retain
        gate (B, T, H), all on the CPU in float64; and the per-lag row of the gradient
        arriving at each output step for the first `keep` samples (`output_lag.lag_sums`:
        sums and counts, a reason there is none, or None when the loss is not per step)."""
        spec = self.specs[name]
        with torch.enable_grad():
            x = call.x
            if isinstance(x, PackedSequence):
                x = PackedSequence(x.data.detach().requires_grad_(True), x.batch_sizes,
                                   x.sorted_indices, x.unsorted_indices)
            else:
                x = x.detach().requires_grad_(True)
            tr = replay(self.modules[name], x, call.hx, rng_state=call.rng_state)
        outs, gouts = [], []
        lengths = _lengths(call.x) if isinstance(call.x, PackedSequence) else None
        for key, t in (("out", tr.output), ("h_n", tr.h_n), ("c_n", tr.c_n)):
            g = call.grad_out.get(key)
            if t is None or g is None:
                continue
            if isinstance(t, PackedSequence):  # padded (n, T, ·) -> the replay's packed rows
                g = pack_padded_sequence(g, lengths, batch_first=True,
                                         enforce_sorted=False).data
                t = t.data
            outs.append(t)
            gouts.append(g.to(t.dtype))
        lag = None
        g_seq = call.grad_out.get("out")
        if g_seq is not None:  # batch-major (B, T, F): a packed one was captured padded
            if not (spec.batch_first or isinstance(call.x, PackedSequence)):
                g_seq = g_seq.transpose(0, 1)
            lag = output_lag.lag_sums(self.modules[name], spec, x, call.hx, tr, g_seq, keep,
                                      call.rng_state)
        sg = trace_state_gradients(tr, outs, gouts)  # (B, T) norms, input-position order
        out = {}
        for layer, dirs in enumerate(tr.layers):
            for d, lt in enumerate(dirs):
                g = sg.layers[layer][d]
                B, T = g.h.shape
                valid = (torch.ones(B, T, dtype=torch.bool) if lengths is None else
                         torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1))
                gate = None
                if spec.kind in RETAIN_GATE:
                    gate = lt.gates[RETAIN_GATE[spec.kind]].detach().to("cpu", torch.float64)
                out[f"l{layer}d{d}"] = {"h": g.h, "c": g.c, "valid": valid, "gate": gate}
        return out, lag

    def _record(self, stats: StatSet, exact: bool) -> dict:
        from ..results import json_number

        v = stats.values
        rec = {"step": self.step_count, "exact": exact}
        if "global_norm" in v:
            rec["global_norm"] = json_number(v["global_norm"].item())
        rec["nonfinite_params"] = {k.split("/", 1)[1]: int(t.item()) for k, t in v.items()
                                   if k.startswith("nonfinite_params/")}
        layers = {}
        for name in self.modules:
            r = {}
            if f"input_sum/{name}" in v:
                mean = v[f"input_sum/{name}"] / v[f"input_count/{name}"].clamp_min(1)
                r["input_grad"] = [json_number(x) for x in mean.tolist()]
            if f"input_nonfinite/{name}" in v:
                r["input_grad_nonfinite"] = int(v[f"input_nonfinite/{name}"].item())
            params = {k[len(f"param/{name}/"):]: json_number(t.item()) for k, t in v.items()
                      if k.startswith(f"param/{name}/")}
            if params:
                r["param_norms"] = params
            state, gates = {}, {}
            for k, t in v.items():
                if k.startswith(f"state_sum/{name}/"):
                    key, which = k.split("/")[2:]
                    cnt = v[f"state_count/{name}/{key}"].clamp_min(1)
                    state.setdefault(key, {})[which] = [json_number(x) for x in
                                                        (t / cnt).tolist()]
                if k.startswith(f"gate_sum/{name}/"):
                    key = k.split("/")[2]
                    unit = t / max(v[f"gate_count/{name}/{key}"].item(), 1)
                    hist = v[f"gate_hist/{name}/{key}"]
                    p = self.policy
                    gates[key] = {"gate": RETAIN_GATE[self.specs[name].kind],
                                  "mean": json_number(unit.mean().item()),
                                  "frac_units_hi": float((unit > p.saturation_hi).double().mean()),
                                  "frac_units_lo": float((unit < p.saturation_lo).double().mean()),
                                  "memory_time_median": json_number(
                                      (1 / (1 - unit)).median().item()),
                                  "hist": [json_number(x) for x in
                                           (hist / max(hist.sum().item(), 1)).tolist()]}
            if f"lag_sum/{name}" in v:
                mean = v[f"lag_sum/{name}"] / v[f"lag_count/{name}"]  # 0/0: no pair: nan
                r["output_lag_grad"] = [json_number(x) for x in mean.tolist()]
            if name in self._lag_notes:
                r["output_lag_note"] = self._lag_notes[name]
            if state:
                r["state_grad"] = state
            if gates:
                r["gates"] = gates
            layers[name] = r
        rec["layers"] = layers
        return rec


def _narrow_call(call: _Call, m: int, batch_dim: int) -> _Call:
    """The call's captured inputs, state and output gradients for its first m samples."""
    if m == call.n:
        return call
    packed = isinstance(call.x, PackedSequence)
    grads = {}
    for key, g in call.grad_out.items():
        dim = (0 if packed else batch_dim) if key == "out" else 1
        grads[key] = None if g is None else g.narrow(dim, 0, m)
    return _Call(x=_first_samples(call.x, m, batch_dim), hx=narrow_state(call.hx, m),
                 rng_state=call.rng_state, grad_out=grads, got_grad=call.got_grad,
                 head=call.head, n=m)


def _accumulate_into(entry: list):
    """A tensor hook adding each gradient that arrives into entry[0] (one per backward)."""
    def on_grad(g):
        g = g.detach()
        entry[0] = g if entry[0] is None else entry[0] + g
        return None

    return on_grad


def _nonfinite_values(g: torch.Tensor, norms: torch.Tensor) -> int:
    """NaN/Inf values of g, counted only when some norm is non-finite (the usual case costs
    nothing)."""
    return 0 if torch.isfinite(norms).all() else int((~torch.isfinite(g)).sum())


def _input_norms(call: _Call) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(T,) sum over samples of ‖∂L/∂x_t‖, (T,) samples that have step t, non-finite values."""
    g = call.input_grad
    n = g.to(torch.float64).norm(dim=-1).cpu()  # (B, T)
    bad = _nonfinite_values(g, n)
    if call.input_lengths is None:
        return n.sum(0), torch.full((n.shape[1],), float(n.shape[0]), dtype=torch.float64), bad
    valid = torch.arange(n.shape[1]).unsqueeze(0) < call.input_lengths.unsqueeze(1)
    return (torch.where(valid, n, torch.zeros_like(n)).sum(0), valid.sum(0).to(torch.float64),
            bad)


def _pool_cell_steps(entries: list, pos: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per step within a sequence: sum over samples of the gradient norm, sample count and
    non-finite values, from per-call [gradient or None, batch] entries. A call whose tensor got
    no gradient counts as zero."""
    P = max(pos[:len(entries)]) + 1
    sums = torch.zeros(P, dtype=torch.float64)
    counts = torch.zeros(P, dtype=torch.float64)
    bad = 0
    for (g, B), p in zip(entries, pos):
        counts[p] += B
        if g is not None:
            n = g.to(torch.float64).norm(dim=-1)  # (B,)
            sums[p] += float(n.sum())
            bad += _nonfinite_values(g, n)
    return sums, counts, bad


def _pad_sum(rows: list) -> torch.Tensor:
    """Sum of 1-D tensors of different lengths, each padded with zeros to the longest."""
    out = torch.zeros(max(r.shape[0] for r in rows), dtype=torch.float64)
    for r in rows:
        out[:r.shape[0]] += r
    return out


def _pad_time(part: dict, T: int) -> dict:
    """A replay part's (B, t, ·) tensors padded along time to T (padding not valid)."""
    out = {}
    for k, v in part.items():
        if v is None or v.shape[1] == T:
            out[k] = v
            continue
        pad = v.new_zeros((v.shape[0], T - v.shape[1]) + tuple(v.shape[2:]))
        out[k] = torch.cat([v, pad], 1)
    return out


def _in_recomputation() -> bool:
    """True inside a backward pass: where non-reentrant activation checkpointing reruns the
    forward. The hooks then only repeat the leaf swap, so the recomputed graph matches."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _replace_first(args, kwargs, x):
    if args:
        return (x,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "input": x}


def _state_tensors(state) -> tuple:
    if isinstance(state, torch.Tensor):
        return (state,)
    if isinstance(state, (tuple, list)):
        return tuple(t for t in state if isinstance(t, torch.Tensor))
    return ()


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


def _packed_rows(g: torch.Tensor, like: PackedSequence, n: int) -> torch.Tensor:
    """Gradient rows (N, ·) of a packed output -> padded (n, T, ·) of its first n samples."""
    return pad_packed(g, like)[:n].clone()


__all__ = ["GradientMonitor"]
