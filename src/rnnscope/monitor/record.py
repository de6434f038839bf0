"""The monitor's record of one training step: a typed, frozen object.

A record holds, per statistic that ran at that step, the statistic's own typed value (floats,
tuples of floats, small frozen dataclasses; NaN stays a float NaN). Values are looked up by the
statistic's name as an attribute (`record.global_norm`, `record.layers["rnn"].input_grad`);
a statistic that did not run at that step reads None.

JSON exists only at the edge: `to_dict()` / `from_dict()` are the JSON Lines codec, written
by the statistics themselves (`Statistic.to_json` / `from_json`). The format on disk is the
one the monitor has always written, so older logs load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Mapping


def _frozen(d) -> dict:
    """A copy the record owns (a plain dict, so records pickle and deep-copy)."""
    return dict(d)


class _Values:
    """Attribute access to `values` by statistic name; None for a known statistic that did
    not run, AttributeError for a name no statistic has."""

    _scope = "layer"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        from .statistics import known_names

        if name in known_names(self._scope):
            return None
        raise AttributeError(f"{type(self).__name__} has no statistic {name!r}; known: "
                             f"{', '.join(sorted(known_names(self._scope)))}")


@dataclass(frozen=True)
class LayerRecord(_Values):
    """One recurrent submodule's statistics at one step: values[statistic name] -> value."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "values", _frozen(self.values))

    def __repr__(self) -> str:
        return f"LayerRecord({', '.join(self.values)})"


@dataclass(frozen=True)
class Record(_Values):
    """One monitored training step.

    Attributes:
        step: the monitor's step count; exact: whether the exact replay ran.
        values: model-wide statistics by name (global_norm, nonfinite_params).
        layers: per recurrent submodule (its name in named_modules()), a LayerRecord.
        skipped: per submodule, why (part of) its exact measurement was skipped.
    """

    step: int
    exact: bool
    values: Mapping[str, Any] = field(default_factory=dict)
    layers: Mapping[str, LayerRecord] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)

    _scope = "model"

    def __post_init__(self):
        for name in ("values", "layers", "skipped"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def __repr__(self) -> str:
        return (f"Record(step={self.step}, exact={self.exact}, layers={list(self.layers)}"
                + (f", skipped={list(self.skipped)}" if self.skipped else "") + ")")

    def to_dict(self) -> dict:
        """The JSON-safe form written to JSON Lines (non-finite floats as "nan"/"inf")."""
        from .statistics import STATISTICS

        out: dict = {"step": self.step, "exact": self.exact}
        for stat in STATISTICS:
            if stat.scope == "model" and stat.name in self.values:
                out.update(stat.to_json(self.values[stat.name]))
        layers = {}
        for lname, lay in self.layers.items():
            d: dict = {}
            for stat in STATISTICS:
                if stat.scope == "layer" and stat.name in lay.values:
                    d.update(stat.to_json(lay.values[stat.name]))
            layers[lname] = d
        out["layers"] = layers
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "Record":
        """A record from its JSON form (this version's or an older monitor's).

        Raises:
            ValueError: a field of the wrong type, naming it.
        """
        from .statistics import STATISTICS

        step = d.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a monitor record needs an integer 'step'; got {step!r:.40}")
        values = _decoded(STATISTICS, "model", d, f"step {step}")
        layers = {}
        raw_layers = d.get("layers", {})
        if not isinstance(raw_layers, Mapping):
            raise ValueError(f"step {step}: 'layers' must be an object")
        for lname, ld in raw_layers.items():
            if not isinstance(ld, Mapping):
                raise ValueError(f"step {step}: layer {lname!r:.60} must be an object")
            layers[lname] = LayerRecord(_decoded(STATISTICS, "layer", ld,
                                                 f"step {step}: layer {lname!r:.60}"))
        skipped = d.get("skipped", {})
        return cls(step=step, exact=bool(d.get("exact", False)), values=values, layers=layers,
                   skipped=dict(skipped) if isinstance(skipped, Mapping) else {})


def _decoded(statistics, scope: str, src: Mapping, where: str) -> dict:
    """The values of the statistics of one scope ("model" or "layer") read from `src`, by
    name; a field that does not decode is a ValueError naming `where` and the statistic."""
    out = {}
    for stat in statistics:
        if stat.scope != scope:
            continue
        try:
            v = stat.from_json(src)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{where}: {stat.name}: {_why(e)}") from None
        if v is not None:
            out[stat.name] = v
    return out


def _why(e: Exception) -> str:
    """A decoding error in a few words: a missing key or a value of the wrong shape."""
    if isinstance(e, KeyError):
        return f"missing field {e}"
    if isinstance(e, AttributeError):
        return "a value of the wrong type"
    return str(e)[:120]
