"""What the command line's studies return: typed, frozen objects built from the analyses'
result objects, and the one layout of results.json (`StudyResult.to_dict`, schema
`codec.SCHEMA`).

A study result holds per-model result objects (`GradientProfile`, `JacobianNorms`,
`LyapunovSpectrum`, `GateStats`, `StateGradients`, `LagProfile`, ...); the report and the
command line read their fields and methods, never positions in a JSON dict. `from_dict`
validates a whole results.json and names the first wrong field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .codec import (SCHEMA, Fields, SchemaError, check_schema, decode_tensor, encode_float,
                    encode_tensor, encode_value)
from .results import (F64, Comparison, DecayTable, GateStats, GradientProfile, JacobianNorms,
                      LagProfile, LyapunovSpectrum, Result, StateGradients)

COMMANDS = ("compare", "inspect", "experiment")

EXPERIMENT_HEADERS = {"model": "variant", "final_over_baseline": "final loss / baseline",
                      "beats_half_baseline_at": "first step < 50% of baseline",
                      "effective_memory_init": "effective memory at init",
                      "effective_memory_end": "effective memory at end"}
"""The experiment summary table's columns and headers (terminal and report.html)."""


@dataclass(frozen=True, eq=False, repr=False)
class Skipped(Result):
    """A module or analysis that was not measured, and why (shown in the report)."""

    reason: str

    def to_dict(self) -> dict:
        return {"skipped": self.reason}

    @classmethod
    def from_dict(cls, d, where: str = "Skipped") -> "Skipped":
        f = d if isinstance(d, Fields) else Fields(d, where)
        return cls(f.str("skipped"))


@dataclass(frozen=True, eq=False, repr=False)
class StepPaths(Result):
    """Batch means of the one-step Jacobian ∂s_n/∂s_{n−1} per processing step n
    (`StepJacobians.summary`): direct_mean (T,) mean |highway| (None without one) and
    indirect_spectral (T,) mean ‖indirect‖₂, both float64; nan at steps no counted sample
    has."""

    direct_mean: torch.Tensor | None
    indirect_spectral: torch.Tensor
    samples: int
    nonfinite_samples: int = 0

    @classmethod
    def of(cls, step_jacobians) -> "StepPaths":
        s = step_jacobians.summary()
        return cls(s.get("direct_mean"), s["indirect_spectral"], s["samples"],
                   s["nonfinite_samples"])

    def _headline(self) -> dict:
        out = {"mean_indirect": float(self.indirect_spectral.nanmean())}
        if self.direct_mean is not None:
            out["mean_direct"] = float(self.direct_mean.nanmean())
        return out

    def to_dict(self) -> dict:
        return {"direct_mean": None if self.direct_mean is None
                else encode_tensor(self.direct_mean),
                "indirect_spectral": encode_tensor(self.indirect_spectral),
                "samples": self.samples, "nonfinite_samples": self.nonfinite_samples}

    @classmethod
    def from_dict(cls, d, where: str = "StepPaths") -> "StepPaths":
        f = d if isinstance(d, Fields) else Fields(d, where)
        ind = f.tensor("indirect_spectral", F64, 1)
        direct = f.tensor("direct_mean", F64, 1, optional=True)
        if ind.numel() == 0 or (direct is not None and direct.shape != ind.shape):
            raise SchemaError(f"{f.where}: indirect_spectral must hold one value per step and "
                              "direct_mean as many")
        return cls(direct, ind, f.int("samples", low=0), f.int("nonfinite_samples", low=0))


@dataclass(frozen=True, eq=False, repr=False)
class LayerAnalysis(Result):
    """One layer and direction of a recurrent module: span Jacobian norms, one-step paths,
    Lyapunov exponents (k = 1)."""

    layer: int
    direction: int
    cell_jacobians: JacobianNorms
    step_paths: StepPaths | None  # None where not measured (sLSTM: dense (4H)² steps)
    lyapunov: LyapunovSpectrum

    @property
    def max_lyapunov(self) -> float:
        """Mean largest Lyapunov exponent over the samples where it is finite."""
        return self.lyapunov.mean_largest()

    def _headline(self) -> dict:
        return {"max_lyapunov": self.max_lyapunov}

    def to_dict(self) -> dict:
        return {"layer": self.layer, "direction": self.direction,
                "cell_jacobians": self.cell_jacobians.to_dict(),
                "step_paths": None if self.step_paths is None else self.step_paths.to_dict(),
                "lyapunov": self.lyapunov.to_dict(),
                # for a reader of the file; recomputed from `lyapunov` when read
                "max_lyapunov": encode_float(self.max_lyapunov),
                "lyapunov_samples": self.lyapunov.finite_samples()}

    @classmethod
    def from_dict(cls, d, where: str = "LayerAnalysis") -> "LayerAnalysis":
        f = d if isinstance(d, Fields) else Fields(d, where)
        cj = JacobianNorms.from_dict(f.obj("cell_jacobians"))
        sp_d = f.obj("step_paths", optional=True)
        sp = None if sp_d is None else StepPaths.from_dict(sp_d)
        if sp is not None and sp.indirect_spectral.shape[0] != cj.spectral.shape[1]:
            raise SchemaError(f"{f.at('step_paths')}: {sp.indirect_spectral.shape[0]} steps, "
                              f"but cell_jacobians has {cj.spectral.shape[1]}")
        return cls(f.int("layer", low=0), f.int("direction", low=0), cj, sp,
                   LyapunovSpectrum.from_dict(f.obj("lyapunov")))


@dataclass(frozen=True, eq=False, repr=False)
class RecurrentAnalysis(Result):
    """Everything measured on one recurrent module (nn.RNN/LSTM/GRU or a cell).

    Attributes:
        kind, nonlinearity, input_size, hidden_size, proj_size, num_layers, num_directions:
            the module (`recurrent.describe`).
        state: the state the Jacobians follow ("c" for an LSTM, else "h").
        jacobian_samples: how many samples the Jacobians used.
        layers: one `LayerAnalysis` per layer and direction, layer-major.
        gates: retain-gate statistics (LSTM, GRU) or None.
        state_gradients: total ‖∂L/∂h_t‖ (and ‖∂L/∂c_t‖) per layer and direction.
        hx_given, calls: (inspect) whether the module received an initial state, and how
            many forward calls its sequence was joined from; None for compare.
        linear_in_state: for a decay recurrence (rnnscope.modern), whether it is linear in its
            state, so that the decay product (the highway) is the whole Jacobian; None for
            nn.RNN/LSTM/GRU.
    """

    kind: str
    nonlinearity: str | None
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    num_directions: int
    state: str
    jacobian_samples: int
    layers: tuple[LayerAnalysis, ...]
    gates: GateStats | None
    state_gradients: StateGradients
    hx_given: bool | None = None
    calls: int | None = None
    linear_in_state: bool | None = None

    def _repr_fields(self) -> dict:
        return {k: getattr(self, k) for k in ("kind", "hidden_size", "num_layers",
                                              "num_directions", "state")}

    def _headline(self) -> dict:
        return {"max_lyapunov": self.layers[0].max_lyapunov} if self.layers else {}

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "kind", "nonlinearity", "input_size", "hidden_size", "proj_size", "num_layers",
            "num_directions", "state", "jacobian_samples")}
        out["layers"] = [x.to_dict() for x in self.layers]
        out["gates"] = None if self.gates is None else self.gates.to_dict()
        out["state_gradients"] = self.state_gradients.to_dict()
        out["hx_given"], out["calls"] = self.hx_given, self.calls
        out["linear_in_state"] = self.linear_in_state
        return out

    @classmethod
    def from_dict(cls, d, where: str = "RecurrentAnalysis") -> "RecurrentAnalysis":
        f = d if isinstance(d, Fields) else Fields(d, where)
        layers = tuple(LayerAnalysis.from_dict(x) for x in f.objects("layers"))
        if not layers:
            raise SchemaError(f"{f.at('layers')} must hold at least one layer")
        gates = f.obj("gates", optional=True)
        hx_given = f.d.get("hx_given")
        if hx_given is not None and not isinstance(hx_given, bool):
            raise SchemaError(f"{f.at('hx_given')} must be true, false or null")
        linear = f.d.get("linear_in_state")
        if linear is not None and not isinstance(linear, bool):
            raise SchemaError(f"{f.at('linear_in_state')} must be true, false or null")
        return cls(f.str("kind"), f.str("nonlinearity", optional=True),
                   f.int("input_size", low=1), f.int("hidden_size", low=1),
                   f.int("proj_size", low=0), f.int("num_layers", low=1),
                   f.int("num_directions", low=1), f.str("state"),
                   f.int("jacobian_samples", low=1), layers,
                   None if gates is None else GateStats.from_dict(gates),
                   StateGradients.from_dict(f.obj("state_gradients")), hx_given,
                   f.int("calls", low=1, optional=True), linear)


def _module_from_dict(f: Fields):
    """A `RecurrentAnalysis`, or `Skipped` for {"skipped": reason}."""
    if "skipped" in f.d:
        return Skipped.from_dict(f)
    return RecurrentAnalysis.from_dict(f)


def _lag_from_dict(f: Fields):
    if "skipped" in f.d:
        return Skipped.from_dict(f)
    return LagProfile.from_dict(f)


@dataclass(frozen=True, eq=False, repr=False)
class StudyResult(Result):
    """What `compare_study` and `inspect_study` return; `to_dict()` is results.json.

    Attributes:
        command: "compare" or "inspect".
        config: the resolved configuration (shown in the report, saved with the results).
        versions: rnnscope, torch and Python versions.
        comparison: the input-gradient profiles, by model name.
        recurrent: by module name, a `RecurrentAnalysis` or `Skipped`.
        decay_table: the constant-forget-gate decay table.
        seconds: wall time of the study.
        lag: (inspect, per-step losses) by model name, a `LagProfile` or `Skipped`.
    """

    command: str
    config: dict
    versions: dict
    comparison: Comparison
    recurrent: dict
    decay_table: DecayTable
    seconds: float
    lag: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.config["seq_len"])

    def analysed(self) -> dict[str, RecurrentAnalysis]:
        """The recurrent modules that were analysed, by name."""
        return {n: r for n, r in self.recurrent.items() if isinstance(r, RecurrentAnalysis)}

    def skipped(self) -> dict[str, str]:
        """Modules that were not analysed: name -> reason."""
        return {n: r.reason for n, r in self.recurrent.items() if isinstance(r, Skipped)}

    def lag_profiles(self) -> dict[str, LagProfile]:
        return {n: r for n, r in self.lag.items() if isinstance(r, LagProfile)}

    def _repr_fields(self) -> dict:
        return {"command": self.command, "models": list(self.comparison.profiles),
                "recurrent": list(self.recurrent), "seconds": self.seconds}

    def _headline(self) -> dict:
        return {f"{name}.half_life": p.half_life()
                for name, p in list(self.comparison.profiles.items())[:3]}

    def __str__(self) -> str:
        return str(self.comparison)

    def to_dict(self) -> dict:
        out = {"schema": SCHEMA, "command": self.command, "config": encode_value(self.config),
               "versions": encode_value(self.versions), "comparison": self.comparison.to_dict(),
               "recurrent": {n: r.to_dict() for n, r in self.recurrent.items()},
               "decay_table": self.decay_table.to_dict(), "seconds": encode_float(self.seconds)}
        if self.lag:
            out["lag"] = {n: r.to_dict() for n, r in self.lag.items()}
        return out

    @classmethod
    def from_dict(cls, d, where: str = "results") -> "StudyResult":
        check_schema(d, where)
        f = Fields(d, where)
        command = f.str("command", choices=("compare", "inspect"))
        config = f.plain("config")
        T = f.obj("config").int("seq_len", low=1)
        comparison = Comparison.from_dict(f.obj("comparison"))
        if not comparison.profiles:
            raise SchemaError(f"{f.at('comparison')}['profiles'] must hold at least one model")
        for name, p in comparison.profiles.items():
            if p.per_sample.shape[1] != T or p.per_sample.shape[0] == 0:
                raise SchemaError(f"{f.at('comparison')}['profiles'][{name!r}]['per_sample'] "
                                  f"must be (samples, seq_len={T}); got shape "
                                  f"{tuple(p.per_sample.shape)}")
        recurrent = {n: _module_from_dict(x) for n, x in f.mapping("recurrent").items()}
        lag = ({n: _lag_from_dict(x) for n, x in f.mapping("lag").items()}
               if f.has("lag") else {})
        return cls(command, config, f.plain("versions"), comparison, recurrent,
                   DecayTable.from_dict(f.obj("decay_table")), f.float("seconds"), lag)

    def plot(self):
        """The gradient-flow figure (linear and log panels)."""
        return self.comparison.plot()


def study_from_dict(d, where: str = "results"):
    """A `StudyResult` or `ExperimentResult` from a results.json's data, by its command."""
    check_schema(d, where)
    command = Fields(d, where).str("command", choices=COMMANDS)
    if command == "experiment":
        return ExperimentResult.from_dict(d, where)
    return StudyResult.from_dict(d, where)


# ---- experiment ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class ExperimentVariant(Result):
    """One trained variant: loss curves, profiles and gates at init and end, and the
    monitor's per-step input-gradient profile.

    Attributes:
        train_loss: (steps,) float64 training loss per step.
        eval_loss: (E, 2) float64 rows (step, held-out loss).
        heatmap: per monitored step, the (T,) float64 mean ‖∂L/∂x_t‖ the monitor recorded, or
            None where it recorded none; monitor_steps (M,) int64.
    """

    variant: str
    train_loss: torch.Tensor
    eval_loss: torch.Tensor
    profile_init: GradientProfile
    profile_end: GradientProfile
    gates_init: GateStats | None
    gates_end: GateStats | None
    monitor_steps: torch.Tensor
    heatmap: tuple
    seconds: float
    extra: dict = field(default_factory=dict)

    def _repr_fields(self) -> dict:
        return {"variant": self.variant, "train_loss": self.train_loss}

    def to_dict(self) -> dict:
        opt = lambda g: None if g is None else g.to_dict()  # noqa: E731
        return {**encode_value(self.extra), "variant": self.variant,
                "train_loss": encode_tensor(self.train_loss),
                "eval_loss": encode_tensor(self.eval_loss),
                "profile_init": self.profile_init.to_dict(),
                "profile_end": self.profile_end.to_dict(),
                "gates_init": opt(self.gates_init), "gates_end": opt(self.gates_end),
                "monitor_steps": encode_tensor(self.monitor_steps),
                "heatmap": [None if r is None else encode_tensor(r) for r in self.heatmap],
                "seconds": encode_float(self.seconds)}

    KNOWN = ("variant", "train_loss", "eval_loss", "profile_init", "profile_end", "gates_init",
             "gates_end", "monitor_steps", "heatmap", "seconds")

    @classmethod
    def from_dict(cls, d, where: str = "ExperimentVariant") -> "ExperimentVariant":
        f = d if isinstance(d, Fields) else Fields(d, where)
        gi, ge = f.obj("gates_init", optional=True), f.obj("gates_end", optional=True)
        ev = f.tensor("eval_loss", F64, 2)
        if ev.shape[0] == 0 or ev.shape[1] != 2:
            raise SchemaError(f"{f.at('eval_loss')} must be rows of (step, loss); got shape "
                              f"{tuple(ev.shape)}")
        steps = f.tensor("monitor_steps", torch.int64, 1)
        rows = f.list("heatmap")
        if len(rows) != steps.shape[0]:
            raise SchemaError(f"{f.at('heatmap')} must have one row per monitored step "
                              f"({steps.shape[0]}); got {len(rows)}")
        heat = tuple(None if r is None else decode_tensor(r, f"{f.at('heatmap')}[{i}]",
                                                          dtype=F64, dim=1)
                     for i, r in enumerate(rows))
        return cls(f.str("variant"), f.tensor("train_loss", F64, 1), ev,
                   GradientProfile.from_dict(f.obj("profile_init")),
                   GradientProfile.from_dict(f.obj("profile_end")),
                   None if gi is None else GateStats.from_dict(gi),
                   None if ge is None else GateStats.from_dict(ge), steps, heat,
                   f.float("seconds"), {k: v for k, v in f.d.items() if k not in cls.KNOWN})


@dataclass(frozen=True, eq=False, repr=False)
class ExperimentResult(Result):
    """What `rnnscope experiment` writes: variants trained on one task, against the task's
    exact memoryless baseline."""

    config: dict
    versions: dict
    baseline: float
    variants: dict
    seconds: float

    command = "experiment"

    def table(self) -> list[dict]:
        """Per variant: final held-out loss over the baseline, the first evaluation step below
        half the baseline (None if never), effective memory at init and end."""
        rows = []
        for name, v in self.variants.items():
            ev = v.eval_loss
            below = (ev[:, 1] < 0.5 * self.baseline).nonzero()
            rows.append({"model": name,
                         "final_over_baseline": float(ev[-1, 1]) / self.baseline,
                         "beats_half_baseline_at": int(ev[below[0, 0], 0]) if len(below)
                         else None,
                         "effective_memory_init": v.profile_init.effective_memory(),
                         "effective_memory_end": v.profile_end.effective_memory()})
        return rows

    def display_table(self) -> list[dict]:
        """`table()` with "never" for a variant that never beat half the baseline."""
        return [{**r, "beats_half_baseline_at": "never" if r["beats_half_baseline_at"] is None
                 else r["beats_half_baseline_at"]} for r in self.table()]

    @property
    def seq_len(self) -> int:
        return int(self.config["T"])

    def _repr_fields(self) -> dict:
        return {"task": self.config.get("task"), "variants": list(self.variants),
                "baseline": self.baseline}

    def to_dict(self) -> dict:
        rows = self.display_table()
        return {"schema": SCHEMA, "command": "experiment", "config": encode_value(self.config),
                "versions": encode_value(self.versions), "baseline": encode_float(self.baseline),
                "variants": {n: v.to_dict() for n, v in self.variants.items()},
                "table": encode_value(rows), "seconds": encode_float(self.seconds)}

    @classmethod
    def from_dict(cls, d, where: str = "results") -> "ExperimentResult":
        check_schema(d, where)
        f = Fields(d, where)
        f.str("command", choices=("experiment",))
        cfg = f.obj("config")  # the fields the report shows
        cfg.str("task")
        for k in ("T", "batch_size", "steps", "sequence_length"):
            cfg.int(k, low=1)
        for k in ("lr", "clip"):
            cfg.float(k)
        baseline = f.float("baseline")
        if not baseline > 0:
            raise SchemaError(f"{f.at('baseline')} must be a positive number; got {baseline}")
        variants = {n: ExperimentVariant.from_dict(x) for n, x in f.mapping("variants").items()}
        if not variants:
            raise SchemaError(f"{f.at('variants')} must hold at least one variant")
        return cls(f.plain("config"), f.plain("versions"), baseline, variants,
                   f.float("seconds"))


def experiment_result(results: dict) -> ExperimentResult:
    """The `ExperimentResult` of the dict `experiments.run_experiment` returns."""
    return ExperimentResult.from_dict({**results, "schema": SCHEMA})


__all__ = ["StudyResult", "ExperimentResult", "ExperimentVariant", "RecurrentAnalysis",
           "LayerAnalysis", "StepPaths", "Skipped", "study_from_dict", "experiment_result"]
