"""The monitor's statistics, one class each (cockpit's quantities, torchmetrics' add_state).

A statistic declares:
- `name`: its field in the record (`record.layers["rnn"].input_grad`) and its JSON key;
- `scope`: "model" (one value per step) or "layer" (one per recurrent submodule);
- `schedule`: "cheap" (every `every` steps: hooks, no extra forward) or "exact" (every
  `replay_every` steps: the replay of the captured samples);
- `states`: its accumulators and their cross-rank reduction, "sum" or "max" (a state may be
  added to under sub-keys, e.g. per layer and direction; each sub-key reduces the same way);
- `update(ctx, add)`: how it is computed from the captured tensors (`capture.Capture`,
  `capture.Replayed`), calling add(state, value, *sub_key);
- `compute(states, ctx)`: the typed record value from the reduced states (None: nothing);
- `to_json` / `from_json`: its part of the JSON Lines record (the codec; older logs load);
- `scalars(value)`: its scalar figures for CSV, TensorBoard and Lightning.

The monitor runs every statistic in `STATISTICS` whose schedule is active; adding a statistic
is adding a class here and listing it there.

Shape legend: B samples, T steps, K lags, H hidden units, G gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar
from collections.abc import Mapping

import torch

from ..recurrent import GATES, RETAIN_GATE
from . import capture, decay_capture, grad_norms, output_lag

GATE_BINS = 20


def _num(v) -> float:
    """A JSON number ("nan"/"inf" strings included) as a float."""
    if isinstance(v, str):
        if v in ("nan", "inf", "-inf"):
            return float(v)
        raise ValueError(f"expected a number; got the text {v!r:.30}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a number; got {type(v).__name__}")
    return float(v)


def _json(v: float):
    """A float for JSON: the one place non-finite floats become "nan"/"inf"/"-inf"."""
    v = float(v)
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _nums(v) -> tuple[float, ...]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list of numbers; got {type(v).__name__}")
    return tuple(_num(x) for x in v)


def _key(layer: int, direction: int) -> str:
    """(layer, direction) as the JSON Lines format has always written it: "l0d1"."""
    return f"l{layer}d{direction}"


def _parse_key(key: str) -> tuple[int, int]:
    if not (key.startswith("l") and "d" in key):
        raise ValueError(f"expected a layer key like 'l0d0'; got {key!r:.30}")
    layer, direction = key[1:].split("d", 1)
    return int(layer), int(direction)


class Statistic:
    """Base class; see the module docstring."""

    name: ClassVar[str]
    scope: ClassVar[str]      # "model" | "layer"
    schedule: ClassVar[str]   # "cheap" | "exact"
    states: ClassVar[Mapping[str, str]]  # state -> "sum" | "max"

    def update(self, ctx, add) -> None:
        raise NotImplementedError

    def compute(self, states: dict, ctx) -> Any:
        raise NotImplementedError

    def to_json(self, value) -> dict:
        raise NotImplementedError

    def from_json(self, d: Mapping) -> Any:
        raise NotImplementedError

    def scalars(self, value) -> dict[str, float]:
        return {}


# ----------------------------------------------------------------------------------------------
# Model-wide


class GlobalNorm(Statistic):
    """‖∇θ L‖ over all parameters (the same on every rank after DDP's averaging: max)."""

    name, scope, schedule = "global_norm", "model", "cheap"
    states = {"norm": "max"}

    def update(self, ctx, add):
        if ctx.param_norms is not None:
            # a float64 tensor: StatSet would make a Python float a float32 tensor first
            add("norm", torch.tensor(grad_norms.norm_of_norms(ctx.param_norm_values),
                                     dtype=torch.float64))

    def compute(self, states, ctx):
        t = states.get(("norm",))
        return None if t is None else float(t)

    def to_json(self, value):
        return {"global_norm": _json(value)}

    def from_json(self, d):
        return None if d.get("global_norm") is None else _num(d["global_norm"])

    def scalars(self, value):
        return {"grad_norm/global": value}


class NonfiniteParams(Statistic):
    """Per parameter with a NaN/Inf gradient, how many values are non-finite."""

    name, scope, schedule = "nonfinite_params", "model", "cheap"
    states = {"count": "max"}

    def update(self, ctx, add):
        if ctx.param_norms is None:
            return
        for i in [i for i, v in enumerate(ctx.param_norm_values) if not math.isfinite(v)]:
            add("count", int((~torch.isfinite(ctx.param_grads[i])).sum()), ctx.param_names[i])

    def compute(self, states, ctx):
        return {k[1]: int(v) for k, v in states.items()}

    def to_json(self, value):
        return {"nonfinite_params": dict(value)}

    def from_json(self, d):
        v = d.get("nonfinite_params")
        return None if v is None else {str(k): int(n) for k, n in v.items()}

    def scalars(self, value):
        return {f"nonfinite/{k}": float(n) for k, n in value.items()}


# ----------------------------------------------------------------------------------------------
# Per recurrent submodule, cheap


class ParamNorms(Statistic):
    """Gradient norm of each parameter of the submodule, per gate block (LSTM i, f, g, o; GRU
    r, z, n): value[parameter][gate] ("" for a parameter without gate blocks)."""

    name, scope, schedule = "param_norms", "layer", "cheap"
    states = {"norm": "max"}

    def update(self, ctx, add):
        # the gate-block norms of every parameter come from the model-wide fused pass
        # (`grad_norms.block_norms`); one (G,) vector per parameter, split into gates in
        # compute(). The submodule's parameters come from the monitor's parameter plan (which
        # recurses into a decay recurrence's submodules, MinGRU's nn.Linear).
        for pname, p in ctx.module_parameters:
            if id(p) in ctx.block_norms:  # parameters with a gradient at this step
                add("norm", ctx.block_norms[id(p)], pname)  # (G,) float64 CPU

    def compute(self, states, ctx):
        out: dict = {}
        gates = GATES.get(ctx.spec.kind, ())
        for (_, pname), v in states.items():
            labels = gates if gates and v.numel() == len(gates) else ("",)
            out[pname] = dict(zip(labels, v.reshape(-1).tolist()))  # float64 -> floats
        return out or None

    def to_json(self, value):
        return {"param_norms": {p + (f".{g}" if g else ""): _json(v)
                                for p, gates in value.items() for g, v in gates.items()}}

    def from_json(self, d):
        v = d.get("param_norms")
        if v is None:
            return None
        out: dict = {}
        for k, n in v.items():
            p, _, g = k.rpartition(".") if k.rpartition(".")[2] in _ALL_GATES else (k, "", "")
            out.setdefault(p, {})[g] = _num(n)
        return out

    def scalars(self, value):
        return {f"grad_norm/{p}" + (f".{g}" if g else ""): v
                for p, gates in value.items() for g, v in gates.items()}


_ALL_GATES = {g for gs in GATES.values() for g in gs}


@dataclass(frozen=True)
class InputGrad:
    """mean ‖∂L/∂x_t‖ per timestep t at the submodule's input, and the non-finite values."""

    mean: tuple[float, ...]
    nonfinite: int = 0


class InputProfile(Statistic):
    """Per-timestep mean ‖∂L/∂x_t‖ at the submodule's input, from a hook on its input."""

    name, scope, schedule = "input_grad", "layer", "cheap"
    states = {"sum": "sum", "count": "sum", "nonfinite": "sum"}

    def update(self, ctx, add):
        cap = ctx.cap
        if cap.cell_input:  # cells: entries per call, pooled by step within each sequence
            if not any(e[0] is not None for e in cap.cell_input):
                return
            sums, counts, bad = capture.pool_cell_steps(cap.cell_input, cap.cell_pos)
        else:
            rows, bad = [], 0  # per chain: (sum over samples, count) per step, along time
            for chain in ctx.chains:
                parts = [capture.input_norms(c) for c in chain if c.input_grad is not None]
                if parts:
                    rows.append((_joined([p[0] for p in parts]),
                                 _joined([p[1] for p in parts])))
                    bad += sum(p[2] for p in parts)
            if not rows:
                return
            sums = capture.pad_sum([r[0] for r in rows])
            counts = capture.pad_sum([r[1] for r in rows])
        add("sum", sums / ctx.world if ctx.world != 1 else sums)
        add("count", counts)
        add("nonfinite", float(bad))

    def compute(self, states, ctx):
        if ("sum",) not in states:
            return None
        mean = states[("sum",)] / states[("count",)].clamp_min(1)
        return InputGrad(tuple(mean.tolist()), int(states[("nonfinite",)]))

    def to_json(self, value):
        out = {"input_grad": [_json(v) for v in value.mean]}
        if value.nonfinite:
            out["input_grad_nonfinite"] = value.nonfinite
        return out

    def from_json(self, d):
        if d.get("input_grad") is None:
            return None
        return InputGrad(_nums(d["input_grad"]), int(d.get("input_grad_nonfinite", 0)))

    def scalars(self, value):
        if not value.mean:
            return {}
        return {"input_grad/lag0": value.mean[-1], "input_grad/first_step": value.mean[0]}


def _joined(parts: list) -> torch.Tensor:
    """1-D tensors joined along time (a chain's calls); one part is returned as it is."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class OutputProfile(InputProfile):
    """Per-timestep mean ‖∂L/∂y_t‖ at the submodule's output sequence, from a hook on it
    (decay recurrences, `decay_capture`; the fused modules' output gradient is read only at
    exact steps). Same value type as `input_grad`."""

    name, scope, schedule = "output_grad", "layer", "cheap"

    def update(self, ctx, add):
        rows, bad = [], 0
        for chain in ctx.chains:
            gs = [getattr(c, "output_grad", None) for c in chain]
            gs = [g for g in gs if g is not None]
            if gs:
                n = [grad_norms.row_norms(g) for g in gs]  # (B, T) each
                rows.append((torch.cat([v.sum(0) for v in n]),
                             torch.cat([torch.full((v.shape[1],), float(v.shape[0]),
                                                   dtype=torch.float64) for v in n])))
                bad += sum(capture.nonfinite_values(g, v) for g, v in zip(gs, n))
        if not rows:
            return
        add("sum", capture.pad_sum([r[0] for r in rows]) / ctx.world)
        add("count", capture.pad_sum([r[1] for r in rows]))
        add("nonfinite", float(bad))

    def to_json(self, value):
        out = {"output_grad": [_json(v) for v in value.mean]}
        if value.nonfinite:
            out["output_grad_nonfinite"] = value.nonfinite
        return out

    def from_json(self, d):
        if d.get("output_grad") is None:
            return None
        return InputGrad(_nums(d["output_grad"]), int(d.get("output_grad_nonfinite", 0)))

    def scalars(self, value):
        if not value.mean:
            return {}
        return {"output_grad/last_step": value.mean[-1], "output_grad/first_step": value.mean[0]}


# ----------------------------------------------------------------------------------------------
# Per recurrent submodule, exact


@dataclass(frozen=True)
class StateGrad:
    """Per timestep, mean ‖∂L/∂h_t‖ and (LSTM) ‖∂L/∂c_t‖ of one layer and direction."""

    h: tuple[float, ...]
    c: tuple[float, ...] | None = None


class StateGradients(Statistic):
    """The exact ∂L/∂h_t, ∂L/∂c_t of the training loss per layer and direction: value[(layer,
    direction)] -> StateGrad. From the replay (fused modules) or hooks on the states (cells)."""

    name, scope, schedule = "state_grad", "layer", "exact"
    states = {"sum": "sum", "count": "sum"}

    def update(self, ctx, add):
        if getattr(ctx.spec, "is_cell", False):
            cap = ctx.cap
            for which, entries in cap.cell_state.items():
                if not any(e[0] is not None for e in entries):
                    continue
                sums, counts, _ = capture.pool_cell_steps(entries, cap.cell_pos)
                add("sum", sums / ctx.world, 0, 0, which)
                add("count", counts, 0, 0, which)
            return
        for (layer, d), p in ctx.state_parts().items():
            valid = p["valid"]
            add("sum", torch.where(valid, p["h"], 0.0).sum(0) / ctx.world, layer, d, "h")
            add("count", valid.sum(0).to(torch.float64), layer, d, "h")
            if p["c"] is not None:
                add("sum", torch.where(valid, p["c"], 0.0).sum(0) / ctx.world, layer, d, "c")
                add("count", valid.sum(0).to(torch.float64), layer, d, "c")

    def compute(self, states, ctx):
        means: dict = {}
        for (state, layer, d, which), v in states.items():
            if state == "sum":
                cnt = states[("count", layer, d, which)].clamp_min(1)
                means.setdefault((layer, d), {})[which] = tuple((v / cnt).tolist())
        return {k: StateGrad(m["h"], m.get("c")) for k, m in sorted(means.items())} or None

    def to_json(self, value):
        return {"state_grad": {_key(*k): {"h": [_json(x) for x in s.h]} |
                               ({} if s.c is None else {"c": [_json(x) for x in s.c]})
                               for k, s in value.items()}}

    def from_json(self, d):
        v = d.get("state_grad")
        if v is None:
            return None
        return {_parse_key(k): StateGrad(_nums(s["h"]), None if s.get("c") is None
                                         else _nums(s["c"])) for k, s in v.items()}

    def scalars(self, value):
        return {f"{_key(*k)}/dL_dh_first_step": s.h[0] for k, s in value.items() if s.h}


@dataclass(frozen=True)
class GateSummary:
    """Retain-gate statistics of one layer and direction over the replayed valid steps:
    which gate ("f" LSTM, "z" GRU), mean, fractions of units whose mean is above / below the
    alert policy's saturation thresholds, median memory time 1/(1−gate) over units, and the
    histogram of all values (GATE_BINS bins over [0, 1], fractions)."""

    gate: str
    mean: float
    frac_units_hi: float
    frac_units_lo: float
    memory_time_median: float
    hist: tuple[float, ...]


def _gate_name(ctx) -> str | None:
    """The gate whose statistics `gates` gives: the retain gate of an LSTM/GRU, "|a|" (the
    decay's modulus) of a decay recurrence, None for none."""
    return getattr(ctx, "gate_name", None) or RETAIN_GATE.get(ctx.spec.kind)


class RetainGates(Statistic):
    """Forget (LSTM) / retain (GRU) gate statistics: value[(layer, direction)] -> GateSummary."""

    name, scope, schedule = "gates", "layer", "exact"
    states = {"sum": "sum", "count": "sum", "hist": "sum"}

    def update(self, ctx, add):
        if getattr(ctx.spec, "is_cell", False) or _gate_name(ctx) is None:
            return
        for (layer, d), p in ctx.state_parts().items():
            if p["gate"] is None:
                continue
            g = p["gate"][p["valid"]]  # (N, H) valid steps only
            add("sum", g.sum(0), layer, d)
            add("count", float(g.shape[0]), layer, d)
            add("hist", torch.histc(g.reshape(-1), GATE_BINS, 0.0, 1.0), layer, d)

    def compute(self, states, ctx):
        out = {}
        p = ctx.policy
        for (state, layer, d), t in sorted(states.items()):
            if state != "sum":
                continue
            unit = t / max(float(states[("count", layer, d)]), 1)
            hist = states[("hist", layer, d)]
            out[(layer, d)] = GateSummary(
                gate=_gate_name(ctx), mean=float(unit.mean()),
                frac_units_hi=float((unit > p.saturation_hi).double().mean()),
                frac_units_lo=float((unit < p.saturation_lo).double().mean()),
                memory_time_median=float((1 / (1 - unit)).median()),
                hist=tuple((hist / max(float(hist.sum()), 1)).tolist()))
        return out or None

    def to_json(self, value):
        return {"gates": {_key(*k): {"gate": g.gate, "mean": _json(g.mean),
                                     "frac_units_hi": g.frac_units_hi,
                                     "frac_units_lo": g.frac_units_lo,
                                     "memory_time_median": _json(g.memory_time_median),
                                     "hist": [_json(x) for x in g.hist]}
                          for k, g in value.items()}}

    def from_json(self, d):
        v = d.get("gates")
        if v is None:
            return None
        return {_parse_key(k): GateSummary(
            gate=str(g.get("gate", "")), mean=_num(g["mean"]),
            frac_units_hi=_num(g.get("frac_units_hi", math.nan)),
            frac_units_lo=_num(g.get("frac_units_lo", math.nan)),
            memory_time_median=_num(g.get("memory_time_median", math.nan)),
            hist=_nums(g.get("hist", []))) for k, g in v.items()}

    def scalars(self, value):
        out = {}
        for k, g in value.items():
            out[f"{_key(*k)}/gate_mean"] = g.mean
            out[f"{_key(*k)}/frac_units_hi"] = g.frac_units_hi
        return out


@dataclass(frozen=True)
class OutputLagRow:
    """The gradient arriving at output step t, by lag: by_lag[k] is the mean over samples and
    output positions t of ‖∂(g_t·y_t)/∂x_{t−k}‖ (see `output_lag`), or None with the `note`
    saying why it was not measured."""

    by_lag: tuple[float, ...] | None
    note: str | None = None


class OutputLag(Statistic):
    """Under a per-step loss: the per-lag row of the gradient arriving at output step t
    (`output_lag.lag_sums` on each replayed call). Absent when the loss is not per step."""

    name, scope, schedule = "output_lag_grad", "layer", "exact"
    states = {"sum": "sum", "count": "sum"}

    def update(self, ctx, add):
        if getattr(ctx, "decay", False):  # said in the record, when the loss is per step
            for chain in ctx.replays():
                for r in chain:
                    g = r.call.grad_out.get("out")
                    if g is not None and output_lag.is_per_step(g[:r.keep], None):
                        ctx.note(self.name, decay_capture.NO_OUTPUT_LAG)
                        return
            return
        if ctx.spec.is_cell:
            return
        for chain in ctx.replays():
            if len(chain) > 1:  # one time axis across calls (a step-wise decoder)
                if self._chain_per_step(chain):
                    ctx.note(self.name, output_lag.CHAINED)
                    return
                continue
            for r in chain:
                g = r.output_grad
                if g is None:
                    continue
                got = output_lag.lag_sums(r.module, r.spec, r.x, r.call.hx, r.trace, g, r.keep)
                if got is None:
                    continue
                if isinstance(got, str):
                    ctx.note(self.name, got)
                    return
                add("sum", got[0] / ctx.world)
                add("count", got[1])

    @staticmethod
    def _chain_per_step(chain) -> bool:
        """Whether gradient reaches a chain's outputs before its last step: a call before the
        last one got some, or a call's own outputs are per step."""
        for i, r in enumerate(chain):
            g = r.output_grad
            if g is None:
                continue
            g = g[:r.keep]
            if i < len(chain) - 1 and bool((g != 0).any()):
                return True
            if output_lag.is_per_step(g, None if r.lengths is None else r.lengths[:r.keep]):
                return True
        return False

    def compute(self, states, ctx):
        note = ctx.notes.get(self.name)
        if ("sum",) not in states:
            return None if note is None else OutputLagRow(None, note)
        mean = states[("sum",)] / states[("count",)]  # 0/0 (no pair at that lag): NaN
        return OutputLagRow(tuple(mean.tolist()), note)

    def to_json(self, value):
        out = {}
        if value.by_lag is not None:
            out["output_lag_grad"] = [_json(v) for v in value.by_lag]
        if value.note is not None:
            out["output_lag_note"] = value.note
        return out

    def from_json(self, d):
        row, note = d.get("output_lag_grad"), d.get("output_lag_note")
        if row is None and note is None:
            return None
        return OutputLagRow(None if row is None else _nums(row),
                            None if note is None else str(note))

    def scalars(self, value):
        if not value.by_lag:
            return {}
        return {"output_lag_grad/lag0": value.by_lag[0]}


STATISTICS: tuple[Statistic, ...] = (GlobalNorm(), NonfiniteParams(), ParamNorms(),
                                     InputProfile(), OutputProfile(), StateGradients(),
                                     RetainGates(),
                                     OutputLag())


def known_names(scope: str) -> set[str]:
    return {s.name for s in STATISTICS if s.scope == scope}


def flat_scalars(record) -> dict[str, float]:
    """{name: float} of a record's scalar figures (CSV, TensorBoard, Lightning): model-wide
    ones by their own name, a submodule's prefixed with its name."""
    out = {}
    for stat in STATISTICS:
        if stat.scope == "model" and stat.name in record.values:
            out.update(stat.scalars(record.values[stat.name]))
    for lname, lay in record.layers.items():
        for stat in STATISTICS:
            if stat.scope == "layer" and stat.name in lay.values:
                out.update({f"{lname}/{k}": v
                            for k, v in stat.scalars(lay.values[stat.name]).items()})
    return out
