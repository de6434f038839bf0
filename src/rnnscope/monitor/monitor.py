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
every statistic describes the summed gradient the optimizer will see. A torch.autograd.grad call
through the graph (a gradient penalty, a saliency map) and a backward(inputs=...) that names
none of the model's parameters reach no .grad and are not counted (`optimizer_backward`). The
exact replay takes at most `max_batch` samples over all independent calls; cells are not
replayed (their state gradients come from hooks), so their exact statistics cover every sample.

Decay recurrences (MinGRU, MinLSTM, LRU, RGLRU, SelectiveSSM, SLSTM and any module that
implements `rnnscope.modern.protocol`) are monitored through the protocol (`decay_capture`):
cheap per-step gradients at their input and outputs and parameter norms; at exact steps the
true ∂L/∂h_t from the protocol's decays (or closed-form step Jacobians), and the decay |a_t| in
place of the retain gate (saturation near 1, memory time 1/(1 − |a|)).

The cheap statistics cost one fused norm pass over every parameter gradient's gate blocks and
one row-norm per hooked input (`grad_norms`), in the gradients' dtype with a float64 recompute
where a float32 sum of squares could under- or overflow.

Each figure is a statistic class in `statistics` that declares its name, its schedule (cheap or
exact), how it is computed from the captured tensors and its cross-rank reduction; `step()`
returns a typed, frozen `Record` of their values (`record.layers["rnn"].input_grad.mean`), and
loggers, alerts and `plot-log` read its fields. JSON exists only in the JSON Lines logger
(`Record.to_dict` / `from_dict`).

Under torch.distributed every statistic's states are reduced across ranks with their declared
reduction (sum or max, one generic `stats.StatSet.sync`); input and state gradients are taken as gradients of the global
objective DDP optimises (each rank's loss / world size), so the reduced per-lag figures equal
those of one process on the concatenated batch. Rank 0 logs.
"""

from __future__ import annotations

import warnings
from collections import deque

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..checks import narrow_state
from ..recurrent import GATES, describe, is_recurrent
from ..site import pad_packed
from ..modern.protocol import DecaySpec, describe_decay, is_decay_recurrence
from . import capture
from . import decay_capture
from . import grad_norms as _grad_norms
from . import statistics as _statistics
from .alerts import AlertPolicy, AlertState, GradientFlowWarning
from .optimizer_backward import OptimizerBackward
from .capture import Call as _Call, Capture as _Capture, chains as _chains
from .capture import _batch_size, _first_samples, _lengths
from .loggers import make_loggers
from .record import LayerRecord, Record
from .schedules import PRESETS, as_schedule
from .stats import StatSet


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GradientMonitor:
    """Training-time gradient-flow monitor. See the module docstring for what it measures.

    Args:
        model: the model being trained; every nn.RNN/LSTM/GRU, cell and decay recurrence
            (rnnscope.modern.protocol) inside is monitored.
        every: cheap statistics schedule (int n: every n steps; or a callable step -> bool).
        replay_every: exact replay schedule (same forms; 0 or None: never).
        max_batch: samples replayed at exact steps (the first ones, over all the step's
            micro-batches; a training-mode module with inter-layer dropout is replayed whole,
            since its masks were drawn for the whole batch, and its first samples kept). Cells
            are not replayed: their exact statistics take every sample.
        loggers: a Logger, a directory / *.jsonl / *.csv path, or a list of those.
        alerts: an AlertPolicy (default thresholds if None).
        history: records kept in memory (`.history`, oldest dropped first).
        preset: "cheap" or "full" — sets every/replay_every (explicit arguments win).
        process_group: torch.distributed group to reduce over (default: the world).
        start_step: the training step of the first `step()` (`step_count`); a run resumed
            from a checkpoint passes the step it resumes at, so that its records (and the
            schedules) continue the earlier run's instead of starting again at 0.
    """

    def __init__(self, model: nn.Module, *, every=None, replay_every=None, max_batch: int = 8,
                 loggers=(), alerts: AlertPolicy | None = None, history: int = 1000,
                 preset: str = "cheap", process_group=None, start_step: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        if not isinstance(max_batch, int) or max_batch <= 0:
            raise ValueError(f"max_batch must be a positive int; got {max_batch!r}")
        if not isinstance(history, int) or history <= 0:
            raise ValueError(f"history must be a positive int; got {history!r}")
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"start_step must be an int ≥ 0 (the training step a resumed run "
                             f"starts at); got {start_step!r}")
        every = PRESETS[preset]["every"] if every is None else every
        replay_every = PRESETS[preset]["replay_every"] if replay_every is None else replay_every
        self.model = model
        self.schedule = as_schedule(every)
        self.replay_schedule = as_schedule(replay_every)
        self.max_batch = max_batch
        self.modules = {(name or type(m).__name__): m for name, m in model.named_modules()
                        if is_recurrent(m) or is_decay_recurrence(m)}
        if not self.modules:
            raise ValueError(f"{type(model).__name__} contains no nn.RNN/LSTM/GRU, cell or "
                             "decay recurrence (MinGRU, LRU, ... or a rnnscope.modern.protocol "
                             "module) to monitor")
        # decay recurrences (decay_capture.py) are described by the protocol, the rest by
        # recurrent.describe
        self.specs = {name: (describe(m) if is_recurrent(m) else describe_decay(m))
                      for name, m in self.modules.items()}
        if alerts is not None and not isinstance(alerts, AlertPolicy):
            raise TypeError("alerts must be an rnnscope.monitor.AlertPolicy (e.g. "
                            "AlertPolicy(explode_norm=1e3)) or None for the default thresholds; "
                            f"got {type(alerts).__name__}")
        self.loggers = make_loggers(loggers)
        self.policy = alerts if alerts is not None else AlertPolicy()
        self._alert_state = AlertState(self.policy)
        self.history: deque = deque(maxlen=history)
        self.alerts: deque = deque(maxlen=history)
        self.process_group = process_group
        self.step_count = start_step
        self._handles: list = []
        self._caps = {name: _Capture() for name in self.modules}
        self._warned: set = set()
        self._failed_loggers: set = set()  # id() of loggers paused after a failure
        self._lag_notes: dict = {}
        self._plan: _ParameterPlan | None = None  # names and gate blocks of the parameters
        # tensor hooks count only the backward passes that reach the parameters' .grad
        self._feeds_grad = OptimizerBackward(lambda: self.model.parameters())

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "GradientMonitor":
        if self.attached:
            return self
        for name, m in self.modules.items():
            if isinstance(self.specs[name], DecaySpec):
                pre, post = decay_capture.make_hooks(self, name, self.specs[name])
            else:
                pre, post = self._make_pre_hook(name), self._make_post_hook(name)
            self._handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(post, with_kwargs=True))
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

    def _counted(self, hook):
        """A tensor hook that sees only the backward passes the optimizer will see (not a
        torch.autograd.grad call through the same graph, see `optimizer_backward`)."""
        return self._feeds_grad.only(hook)

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
                    cap.tensor_handles.append(
                        data.register_hook(self._counted(_accumulate_into(entry))))
                return _replace_first(args, kwargs, x) if changed else None
            prev = cap.calls[-1] if cap.calls else None
            call = _Call()
            call.state_in = tuple(id(t) for t in state_in)
            call.head = not (prev is not None and call.state_in
                             and call.state_in == prev.state_out)
            cap.calls.append(call)
            if cheap:
                call.input_lengths = _lengths(x) if packed else None
                cap.tensor_handles.append(data.register_hook(self._counted(
                    self._input_grad_hook(call, x if packed else None, batch_dim))))
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
                        cap.tensor_handles.append(
                            s.register_hook(self._counted(_accumulate_into(entry))))
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
                    cap.tensor_handles.append(data.register_hook(self._counted(grab)))
            return None

        return hook

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> Record | None:
        """Close the current training step: compute, reduce, alert, log. Returns its `Record`
        (None on steps the schedules skip). Call after backward, before optimizer.step()."""
        cheap, exact = self._active()
        record = None
        if (cheap or exact) and not self.attached and "unattached" not in self._warned:
            self._warned.add("unattached")
            warnings.warn("rnnscope monitor: step() on a monitor that is not attached: only "
                          "parameter gradients are measured; call monitor.attach() before the "
                          "training loop, or use it as a context manager (with "
                          "GradientMonitor(model) as monitor: ...)", GradientFlowWarning,
                          stacklevel=2)
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

    def _parameter_plan(self) -> _ParameterPlan:
        params = tuple(self.model.parameters())
        if self._plan is None or not self._plan.current(params):
            self._plan = _ParameterPlan(self.model, self.modules, self.specs)
        return self._plan

    def _measure(self, cheap: bool, exact: bool) -> Record:
        rank, world = _world()
        stats = StatSet()
        active = [st for st in _statistics.STATISTICS  # read at each step: extensible
                  if (st.schedule == "cheap" and cheap) or (st.schedule == "exact" and exact)]
        skipped = {}
        model_ctx = _ModelContext(self._parameter_plan()) if cheap else None
        contexts = {}
        for st in active:
            if st.scope == "model":
                st.update(model_ctx, _adder(stats, st, None))
        for name, cap in self._caps.items():
            kind = (_DecayLayerContext if isinstance(self.specs[name], DecaySpec)
                    else _LayerContext)
            ctx = contexts[name] = kind(self, name, cap, world, model_ctx)
            for st in active:
                if st.scope != "layer":
                    continue
                try:
                    st.update(ctx, _adder(stats, st, name))
                except _ReplaySkipped as e:
                    ctx.skip = str(e)
            if cap.skipped:
                skipped[name] = cap.skipped
            if ctx.skip:
                skipped[name] = ctx.skip
        stats.sync(self.process_group)
        model_states: dict = {}
        layer_states: dict = {}
        for key, value in stats.values.items():
            stat, layer, *rest = key
            where = model_states if layer is None else layer_states.setdefault(layer, {})
            where.setdefault(stat, {})[tuple(rest)] = value
        values = {}
        for st in active:
            if st.scope == "model" and st.name in model_states:
                v = st.compute(model_states[st.name], model_ctx)
                if v is not None:
                    values[st.name] = v
        layers = {}
        for name in self.modules:
            lv = {}
            for st in active:
                if st.scope != "layer":
                    continue
                states = layer_states.get(name, {}).get(st.name, {})
                if not states and st.name not in contexts[name].notes:
                    continue
                v = st.compute(states, contexts[name])
                if v is not None:
                    lv[st.name] = v
            layers[name] = LayerRecord(lv)
        record = Record(step=self.step_count, exact=exact, values=values, layers=layers,
                        skipped=skipped)
        for name, why in skipped.items():
            if (name, why) not in self._warned:
                self._warned.add((name, why))
                warnings.warn(f"rnnscope monitor: {name}: {why}", GradientFlowWarning,
                              stacklevel=3)
        alerts = self._alert_state.check(record.step, record)
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

    def _write(self, lg, record: Record, alerts: list) -> None:
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
                          f"{record.step} ({type(e).__name__}: {e}); it is paused for "
                          "the rest of this run, training goes on", GradientFlowWarning,
                          stacklevel=4)


class _ReplaySkipped(Exception):
    """The exact replay of a submodule was refused; its message says why."""


def _adder(stats: StatSet, st, layer):
    """add(state, value, *sub_key) for statistic `st`, with the reduction it declared."""
    def add(state: str, value, *sub) -> None:
        stats.add((st.name, layer, state, *sub), value, st.states[state])

    return add


class _ModelContext:
    """What model-wide statistics read: every parameter gradient, and their norms; and for
    the recurrent submodules' parameters, the norm of each gate block.

    All norms come from one pass (`grad_norms.block_norms`): each recurrent parameter's
    gradient as its G gate blocks (LSTM i, f, g, o; GRU r, z, n; one block otherwise), every
    other gradient whole. A parameter's norm is the root sum of squares of its blocks' norms.
    Which parameters there are, and their names and blocks, comes from `plan`
    (`_ParameterPlan`), made once and reused while the model's parameters stay the same.
    """

    def __init__(self, plan: "_ParameterPlan"):
        present = [i for i, p in enumerate(plan.params) if p.grad is not None]
        self.module_params = plan.module_params  # submodule name -> its (name, parameter)
        self.param_names = [plan.names[i] for i in present]
        self.param_grads = [plan.params[i].grad.detach() for i in present]
        blocks = [plan.blocks[i] for i in present]
        norms = _grad_norms.block_norms(self.param_grads, blocks)  # (Σ blocks,) float64 CPU
        # id(parameter) -> its gate blocks' norms, (G,) float64 CPU (views: one split)
        self.block_norms = dict(zip((id(plan.params[i]) for i in present), norms.split(blocks)))
        values, per_param, at = norms.tolist(), [], 0
        for count in blocks:
            b = values[at:at + count]
            per_param.append(b[0] if count == 1 else _grad_norms.norm_of_norms(b))
            at += count
        self.param_norm_values = per_param  # the same numbers as Python floats
        # (parameters,) float64 CPU
        self.param_norms = torch.tensor(per_param, dtype=torch.float64) if per_param else None


class _ParameterPlan:
    """The model's parameters in `named_parameters` order, their names and how many gate blocks
    each gradient splits into (G for a recurrent submodule's own weights and biases, 1 for a
    projection weight_hr and any other tensor).

    Walking the modules for names and blocks at every step cost more than the norms
    themselves; the plan is remade only when `model.parameters()` yields other tensors (a
    parameter added, removed or replaced). It holds the parameters, so their ids stay theirs.
    """

    def __init__(self, model: nn.Module, modules: dict, specs: dict):
        blocks_of: dict = {}  # id(parameter) -> gate blocks it splits into
        for name, m in modules.items():
            G = len(GATES.get(specs[name].kind, ())) or 1  # decay recurrences: no gate blocks
            for pname, p in m.named_parameters(recurse=False):
                blocks_of.setdefault(id(p), 1 if pname.startswith("weight_hr") else G)
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = tuple(p for _, p in named)
        self.blocks = [blocks_of.get(id(p), 1) for p in self.params]
        # per monitored submodule, its own (name, parameter) pairs; a decay recurrence keeps
        # its weights in submodules (MinGRU's nn.Linear), so those recurse
        self.module_params = {
            name: list(m.named_parameters(recurse=isinstance(specs[name], DecaySpec)))
            for name, m in modules.items()}

    def current(self, params: tuple) -> bool:
        """Whether `params` (the model's parameters now) are the ones this plan was made for."""
        return len(params) == len(self.params) and all(
            a is b for a, b in zip(params, self.params))


class _LayerContext:
    """What a submodule's statistics read at one step: its capture, its chains of calls, and
    (computed once, on first use) the exact replay of them."""

    def __init__(self, mon: GradientMonitor, name: str, cap: _Capture, world: int,
                 model_ctx: _ModelContext | None = None):
        self.name, self.cap, self.world = name, cap, world
        # id(parameter) -> (G,) gate-block gradient norms (cheap steps; from the fused pass)
        self.block_norms = {} if model_ctx is None else model_ctx.block_norms
        self.module_parameters = [] if model_ctx is None else model_ctx.module_params[name]
        self.module, self.spec = mon.modules[name], mon.specs[name]
        self.policy, self.max_batch = mon.policy, mon.max_batch
        self.chains = _chains(cap)
        self.notes: dict = {}  # statistic name -> why its value is missing or partial
        self.skip: str | None = None
        self._replays = self._parts = None

    def note(self, stat: str, why: str) -> None:
        self.notes.setdefault(stat, why)

    def replays(self) -> list:
        """Per chain, its calls replayed (`capture.replay_chains`)."""
        if self._replays is None:
            try:
                self._replays = capture.replay_chains(self.module, self.spec, self.cap,
                                                      self.max_batch)
                for chain in self._replays:
                    for r in chain:
                        r.state_parts  # noqa: B018 - the replay's backward, where it can fail
            except (ValueError, TypeError) as e:  # e.g. cuDNN dropout, a refused subclass
                self._replays = []
                raise _ReplaySkipped(f"exact replay skipped: {e}") from None
        return self._replays

    def state_parts(self) -> dict:
        if self._parts is None:
            self._parts = capture.joined_state_parts(self.replays())
        return self._parts


class _DecayLayerContext(_LayerContext):
    """A decay recurrence's context: its calls replayed through the protocol
    (`decay_capture`); the decay |a| stands where the retain gate stands."""

    gate_name = "|a|"
    decay = True

    def replays(self) -> list:
        if self._replays is None:
            try:
                self._replays = decay_capture.replay_chains(self.spec, self.cap, self.max_batch)
                for chain in self._replays:
                    for r in chain:
                        r.state_parts  # noqa: B018 - where the protocol's methods can fail
            except (ValueError, TypeError, RuntimeError) as e:
                self._replays = []
                raise _ReplaySkipped(f"exact replay skipped: {type(e).__name__}: {e}") from None
        return self._replays


def _accumulate_into(entry: list):
    """A tensor hook adding each gradient that arrives into entry[0] (one per backward)."""
    def on_grad(g):
        g = g.detach()
        entry[0] = g if entry[0] is None else entry[0] + g
        return None

    return on_grad


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


def _packed_rows(g: torch.Tensor, like: PackedSequence, n: int) -> torch.Tensor:
    """Gradient rows (N, ·) of a packed output -> padded (n, T, ·) of its first n samples."""
    return pad_packed(g, like)[:n].clone()


__all__ = ["GradientMonitor"]
