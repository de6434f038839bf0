"""Alerts: vanishing, exploding, non-finite, saturated gates, and a clipping suggestion.

Each alert has a clear message naming the layer, the step and the figure; it is rate-limited
(one per kind and layer per `cooldown` steps) and delivered as a Python warning
(`GradientFlowWarning`), to the loggers and to an optional callback.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from dataclasses import dataclass, field


class GradientFlowWarning(UserWarning):
    """Category of the warnings the monitor emits."""


@dataclass(frozen=True)
class Alert:
    """One alert: kind ("vanishing", "exploding", "nonfinite", "saturation", "clipping"),
    the training step, the layer (or "model"; "parameters" for non-finite parameter gradients,
    which one alert names), the figure that triggered it and a message."""

    kind: str
    step: int
    layer: str
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict:
        from ..codec import encode_float

        return {"kind": self.kind, "step": self.step, "layer": self.layer,
                "value": encode_float(self.value), "threshold": encode_float(self.threshold),
                "message": self.message}


@dataclass
class AlertPolicy:
    """Thresholds of the monitor's alerts.

    Attributes:
        vanish_lag: K, the lag (steps before the last timestep) from which gradient counts as
            "far"; vanish_eps: alert when the largest mean ‖∂L/∂x‖ at lags ≥ K is below
            eps × the one at lag 0.
        explode_norm: alert when the global gradient norm exceeds this (None: off);
            explode_factor: ... or jumps above factor × its running median over
            `median_window` steps (after `min_history` steps).
        saturation_frac: alert when more than this fraction of units have a mean gate above
            saturation_hi or below saturation_lo (seen at replay steps).
        clip_after: steps of norm history after which one clipping suggestion is made (0: off);
            clip_quantile: the suggested max_norm is this quantile of the observed norms.
        cooldown: steps between two alerts of the same kind for the same layer.
        warn: deliver alerts as Python warnings; callback: called with each Alert.
    """

    vanish_lag: int = 20
    vanish_eps: float = 1e-3
    explode_norm: float | None = None
    explode_factor: float = 10.0
    median_window: int = 50
    min_history: int = 10
    saturation_frac: float = 0.5
    saturation_hi: float = 0.99
    saturation_lo: float = 0.01
    clip_after: int = 200
    clip_quantile: float = 0.99
    cooldown: int = 100
    warn: bool = True
    callback: object = None

    def __post_init__(self):
        from ..checks import check_number

        fn = "AlertPolicy"
        check_number(fn, "vanish_lag", self.vanish_lag, low=1, integer=True)
        check_number(fn, "vanish_eps", self.vanish_eps, low=0, high=1, low_open=True,
                     high_open=True)
        check_number(fn, "explode_norm", self.explode_norm, low=0, low_open=True,
                     allow_none=True, hint="None turns the fixed bound off")
        check_number(fn, "explode_factor", self.explode_factor, low=0, low_open=True,
                     hint="a jump above factor × the running median alerts")
        check_number(fn, "median_window", self.median_window, low=1, integer=True)
        check_number(fn, "min_history", self.min_history, low=1, integer=True)
        check_number(fn, "saturation_frac", self.saturation_frac, low=0, high=1)
        check_number(fn, "saturation_hi", self.saturation_hi, low=0, high=1, low_open=True,
                     high_open=True)
        check_number(fn, "saturation_lo", self.saturation_lo, low=0, high=1, low_open=True,
                     high_open=True)
        if not self.saturation_lo < self.saturation_hi:
            raise ValueError(f"{fn}: saturation_lo must be below saturation_hi; got "
                             f"{self.saturation_lo} and {self.saturation_hi}")
        check_number(fn, "clip_after", self.clip_after, low=0, integer=True,
                     hint="0 turns the suggestion off")
        check_number(fn, "clip_quantile", self.clip_quantile, low=0, high=1, low_open=True)
        check_number(fn, "cooldown", self.cooldown, low=0, integer=True)
        if not isinstance(self.warn, bool):
            raise TypeError(f"{fn}: warn must be True or False; got {self.warn!r}")
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"{fn}: callback must be callable or None; got "
                            f"{type(self.callback).__name__}")


@dataclass
class AlertState:
    """What the alerts remember between steps (bounded)."""

    policy: AlertPolicy
    norms: deque = field(default_factory=lambda: deque(maxlen=5000))
    last: dict = field(default_factory=dict)
    clip_done: bool = False

    def _fire(self, out: list, alert: Alert) -> None:
        key = (alert.kind, alert.layer)
        prev = self.last.get(key)
        if prev is not None and alert.step - prev < self.policy.cooldown:
            return
        self.last[key] = alert.step
        out.append(alert)

    def check(self, step: int, record) -> list[Alert]:
        """Alerts raised by one step's `Record` (see GradientMonitor for its fields)."""
        p, out = self.policy, []
        bad_params = {n: int(c) for n, c in (record.nonfinite_params or {}).items() if c}
        if bad_params:
            # one alert naming the parameters: a NaN in the input reaches every gradient, and
            # one warning per parameter would bury it
            named = ", ".join(f"{n} ({c})" for n, c in list(bad_params.items())[:4])
            more = len(bad_params) - 4
            total = sum(bad_params.values())
            self._fire(out, Alert("nonfinite", step, "parameters", total, 0,
                                  f"step {step}: {total} non-finite (NaN/Inf) gradient "
                                  f"value(s) in {len(bad_params)} parameter(s): {named}"
                                  + (f" and {more} more" if more > 0 else "")))
        g = record.global_norm
        if g is not None and math.isfinite(g):
            # the last median_window norms (order does not matter for a median): read from
            # the end, not a copy of all 5000 kept for the clipping suggestion at every step
            hist = list(itertools.islice(reversed(self.norms), p.median_window))
            if p.explode_norm is not None and g > p.explode_norm:
                self._fire(out, Alert("exploding", step, "model", g, p.explode_norm,
                                      f"step {step}: global gradient norm {g:.3g} exceeds the "
                                      f"bound {p.explode_norm:.3g}"))
            elif len(hist) >= p.min_history:
                med = statistics.median(hist)
                if med > 0 and g > p.explode_factor * med:
                    self._fire(out, Alert("exploding", step, "model", g, p.explode_factor * med,
                                          f"step {step}: global gradient norm {g:.3g} jumped to "
                                          f"{g / med:.1f}× its running median {med:.3g}"))
            self.norms.append(g)
        for layer, rec in record.layers.items():
            inp = rec.input_grad
            prof = None if inp is None else inp.mean  # mean ‖∂L/∂x_t‖ per timestep t
            if prof is not None and len(prof) > p.vanish_lag:
                lag0 = prof[-1]
                far = max(prof[: len(prof) - p.vanish_lag])
                if lag0 > 0 and math.isfinite(lag0) and math.isfinite(far) and \
                        far < p.vanish_eps * lag0:
                    self._fire(out, Alert("vanishing", step, layer, far / lag0, p.vanish_eps,
                                          f"step {step}: {layer}: gradient reaching lag ≥ "
                                          f"{p.vanish_lag} is {far / lag0:.2e} of the gradient at "
                                          f"lag 0 (threshold {p.vanish_eps:.0e})"))
            bad = 0 if inp is None else inp.nonfinite
            if bad:
                self._fire(out, Alert("nonfinite", step, f"{layer} input", bad, 0,
                                      f"step {step}: {int(bad)} non-finite value(s) in "
                                      f"∂L/∂x at the input of {layer}"))
            for (lay, d), gate in (rec.gates or {}).items():
                key = f"l{lay}d{d}"
                hi, lo = gate.frac_units_hi, gate.frac_units_lo
                if max(hi, lo) > p.saturation_frac:
                    which = f"> {p.saturation_hi}" if hi >= lo else f"< {p.saturation_lo}"
                    self._fire(out, Alert("saturation", step, f"{layer} {key}", max(hi, lo),
                                          p.saturation_frac,
                                          f"step {step}: {layer} {key}: {100 * max(hi, lo):.0f}% "
                                          f"of units have a mean {gate.gate} gate {which} "
                                          f"(threshold {100 * p.saturation_frac:.0f}%)"))
        if p.clip_after and not self.clip_done and len(self.norms) >= p.clip_after:
            self.clip_done = True
            ns = sorted(self.norms)
            q = ns[min(len(ns) - 1, int(p.clip_quantile * len(ns)))]
            med = statistics.median(ns)
            clipped = sum(n > q for n in ns) / len(ns)
            self._fire(out, Alert("clipping", step, "model", q, med,
                                  f"step {step}: over {len(ns)} steps the global gradient norm "
                                  f"had median {med:.3g} and {100 * p.clip_quantile:g}th "
                                  f"percentile {q:.3g}; torch.nn.utils.clip_grad_norm_("
                                  f"max_norm={q:.3g}) would have clipped {100 * clipped:.1f}% "
                                  "of steps"))
        return out
