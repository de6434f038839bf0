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

The model is never changed: outputs and parameter gradients are bit-identical with and without
the monitor (the input hook only makes a data tensor that did not require grad into a fresh leaf
that does, with the same values), module hooks are held as handles and removed on detach — also
when the training step raises — and nothing of the model's is kept between steps but CPU floats.
Only the first call of each recurrent submodule per step is measured.

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

from ..checks import narrow_state
from ..recurrent import GATES, RETAIN_GATE, describe, is_recurrent
from ..jacobians import trace_state_gradients
from ..replay import replay
from .alerts import AlertPolicy, AlertState, GradientFlowWarning
from .loggers import make_loggers
from .schedules import PRESETS, as_schedule
from .stats import StatSet

GATE_BINS = 20


@dataclass
class _Capture:
    """What one recurrent submodule's hooks saw during the current step."""

    seen: bool = False
    skipped: str | None = None
    tensor_handles: list = field(default_factory=list)
    # cheap path: sums over samples of per-sample ‖∂L/∂x_t‖, per timestep t
    input_sum: torch.Tensor | None = None
    input_count: int = 0
    input_nonfinite: int = 0
    # exact path (fused): inputs, initial state and output gradients of the first max_batch
    x: torch.Tensor | None = None
    hx: object = None
    grad_out: dict = field(default_factory=dict)
    # cells: one entry per call (= per timestep)
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
        max_batch: samples replayed at exact steps.
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
            want_dim = 2 if spec.is_cell else 3
            if not isinstance(x, torch.Tensor) or x.dim() != want_dim:
                cap.skipped = ("inputs that are not a batched tensor (PackedSequence, "
                               "unbatched) are not measured")
                return None
            if not spec.is_cell:
                if cap.seen:
                    return None
                cap.seen = True
            changed = False
            if cheap:
                if not x.requires_grad:  # a data tensor: make a fresh leaf with equal values
                    x = x.detach().requires_grad_(True)
                    changed = True
                t = len(cap.cell_input)  # cells: this call's timestep (backward runs reversed)
                if spec.is_cell:
                    cap.cell_input.append(None)
                cap.tensor_handles.append(x.register_hook(
                    self._input_grad_hook(name, batch_dim, t)))
            if exact and not spec.is_cell:
                n = min(self.max_batch, x.shape[batch_dim])
                cap.x = x.detach().narrow(batch_dim, 0, n).clone()
                hx = args[1] if len(args) > 1 else kwargs.get("hx")
                cap.hx = narrow_state(hx, n, clone=True)
            if not changed:
                return None
            if args:
                return (x,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "input": x}

        return hook

    def _input_grad_hook(self, name: str, batch_dim: int, t: int):
        spec = self.specs[name]

        def on_grad(g):
            cap = self._caps[name]
            n = g.detach().to(torch.float64).norm(dim=-1)  # (B, T) / (T, B); cells: (B,)
            # a NaN/Inf value makes its norm non-finite: count values only then
            bad = 0 if torch.isfinite(n).all() else int((~torch.isfinite(g)).sum())
            if spec.is_cell:
                cap.cell_input[t] = (n.sum().cpu(), n.numel())
            else:
                n = n if batch_dim == 0 else n.t()
                cap.input_sum = n.sum(0).cpu()
                cap.input_count = n.shape[0]
            cap.input_nonfinite += bad
            return None

        return on_grad

    def _make_post_hook(self, name: str):
        spec = self.specs[name]
        batch_dim = 0 if (spec.batch_first or spec.is_cell) else 1

        def hook(module, args, kwargs, output):
            cheap, exact = self._active()
            if not exact or not torch.is_grad_enabled():
                return None
            cap = self._caps[name]
            if spec.is_cell:  # exact state gradients straight from the returned state
                t = len(cap.cell_state.get("h", []))
                states = output if isinstance(output, tuple) else (output,)
                for key, s in zip(("h", "c"), states):
                    cap.cell_state.setdefault(key, []).append(None)
                    if isinstance(s, torch.Tensor) and s.requires_grad:
                        cap.tensor_handles.append(s.register_hook(
                            self._cell_state_hook(name, key, t)))
                return None
            if cap.x is None or "out" in cap.grad_out:
                return None
            n = cap.x.shape[batch_dim]
            out, hn = output
            pieces = {"out": (out, batch_dim)}
            if isinstance(hn, tuple):
                pieces["h_n"], pieces["c_n"] = (hn[0], 1), (hn[1], 1)
            else:
                pieces["h_n"] = (hn, 1)
            for key, (t, dim) in pieces.items():
                cap.grad_out[key] = None  # stays None if no gradient reaches it
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    def grab(g, key=key, dim=dim):
                        self._caps[name].grad_out[key] = g.detach().narrow(dim, 0, n).clone()
                    cap.tensor_handles.append(t.register_hook(grab))
            return None

        return hook

    def _cell_state_hook(self, name: str, key: str, t: int):
        def on_grad(g):
            n = g.detach().to(torch.float64).norm(dim=-1)
            self._caps[name].cell_state[key][t] = (n.sum().cpu(), n.numel())
        return on_grad

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> dict | None:
        """Close the current training step: compute, reduce, alert, log. Returns its record
        (None on steps the schedules skip). Call after backward, before optimizer.step()."""
        cheap, exact = self._active()
        record = None
        try:
            if cheap or exact:
                record = self._measure(cheap, exact)
        finally:
            self._reset_captures()
            self.step_count += 1
        return record

    def _measure(self, cheap: bool, exact: bool) -> dict:
        rank, world = _world()
        stats = StatSet()
        skipped = {}
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
                lg.log(record)
                for a in alerts:
                    lg.log_alert(a)
        self.history.append(record)
        return record

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
        done = [v for v in cap.cell_input if v is not None]
        if done:  # a step whose input got no gradient counts as zero
            sums = torch.tensor([0.0 if v is None else float(v[0]) for v in cap.cell_input],
                                dtype=torch.float64)
            stats.add(f"input_sum/{name}", sums / world, "sum")
            stats.add(f"input_count/{name}", float(done[0][1]), "sum")
        elif cap.input_sum is not None:
            stats.add(f"input_sum/{name}", cap.input_sum / world, "sum")
            stats.add(f"input_count/{name}", float(cap.input_count), "sum")
        if cap.input_nonfinite:
            stats.add(f"input_nonfinite/{name}", float(cap.input_nonfinite), "sum")

    def _exact_stats(self, stats, name, cap, world) -> str | None:
        spec = self.specs[name]
        if spec.is_cell:
            count = None
            for key, per_t in cap.cell_state.items():
                done = [v for v in per_t if v is not None]
                if not done:
                    continue
                sums = torch.tensor([0.0 if v is None else float(v[0]) for v in per_t],
                                    dtype=torch.float64)
                stats.add(f"state_sum/{name}/l0d0/{key}", sums / world, "sum")
                count = done[0][1]
            if count is not None:
                stats.add(f"state_count/{name}/l0d0", float(count), "sum")
            return None
        if cap.x is None:
            return None
        try:
            with torch.enable_grad():
                x = cap.x.detach().requires_grad_(True)
                tr = replay(self.modules[name], x, cap.hx)
        except ValueError as e:  # e.g. inter-layer dropout in training mode
            return f"exact replay skipped: {e}"
        outs, gouts = [], []
        for key, t in (("out", tr.output), ("h_n", tr.h_n), ("c_n", tr.c_n)):
            g = cap.grad_out.get(key)
            if t is not None and g is not None:
                outs.append(t)
                gouts.append(g.to(t.dtype))
        sg = trace_state_gradients(tr, outs, gouts)  # (B, T) norms, input-position order
        B = x.shape[0 if spec.batch_first else 1]
        for layer, dirs in enumerate(tr.layers):
            for d, lt in enumerate(dirs):
                key = f"l{layer}d{d}"
                g = sg.layers[layer][d]
                for which, norms in (("h", g.h), ("c", g.c)):
                    if norms is not None:
                        stats.add(f"state_sum/{name}/{key}/{which}", norms.sum(0) / world, "sum")
                stats.add(f"state_count/{name}/{key}", float(B), "sum")
                if spec.kind in RETAIN_GATE:
                    gate = lt.gates[RETAIN_GATE[spec.kind]].detach().to(torch.float64)
                    stats.add(f"gate_sum/{name}/{key}", gate.sum((0, 1)).cpu(), "sum")
                    stats.add(f"gate_count/{name}/{key}", float(gate.shape[0] * gate.shape[1]),
                              "sum")
                    stats.add(f"gate_hist/{name}/{key}",
                              torch.histc(gate.reshape(-1).cpu(), GATE_BINS, 0.0, 1.0), "sum")
        return None

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
                mean = v[f"input_sum/{name}"] / max(v[f"input_count/{name}"].item(), 1)
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
                    cnt = max(v[f"state_count/{name}/{key}"].item(), 1)
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
            if state:
                r["state_grad"] = state
            if gates:
                r["gates"] = gates
            layers[name] = r
        rec["layers"] = layers
        return rec


__all__ = ["GradientMonitor"]
