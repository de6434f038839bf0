"""Frozen result objects: detached CPU tensors (float64 for norms), `.to_dict()`,
`.from_dict()`, `.plot()`.

Computing never imports matplotlib: `.plot()` defers to `rnnscope.plotting`, imported lazily.
JSON exists only at the edges and goes through `rnnscope.codec` (non-finite floats, tensors,
validation); `from_dict(to_dict(r)) == r` holds exactly for every result, NaN for NaN.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .codec import Fields, encode_float, encode_tensor, encode_value
from .spectral import spectral_norms

F64, I64, BOOL = torch.float64, torch.int64, torch.bool


def same_value(a, b) -> bool:
    """Exact equality of result fields: tensors by dtype, shape and values (NaN equals NaN,
    -0.0 equals 0.0), floats likewise, containers element by element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_value, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, Result) and isinstance(b, Result):
        return a == b
    return type(a) is type(b) and a == b


def _describe(v) -> str:
    """A field's value in a repr: tensors by dtype and shape, never their values."""
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return f"{{{len(v)} entries}}"
    if isinstance(v, (tuple, list)):
        return f"[{len(v)} items]"
    if isinstance(v, Result):
        return type(v).__name__
    return repr(v)


class Result:
    """Shared behaviour of result objects: exact `==`, a short repr (class name, shapes and
    a few headline numbers, never whole tensors) and a notebook `_repr_html_`."""

    __hash__ = None  # mutable-by-content tensors inside: not hashable

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(same_value(getattr(self, f.name), getattr(other, f.name))
                   for f in dataclasses.fields(self))

    def _headline(self) -> dict:
        """A few numbers that say what the result found (overridden per class)."""
        return {}

    def _repr_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "config" and getattr(self, f.name) is not None}

    def __repr__(self) -> str:
        parts = [f"{k}={_describe(v)}" for k, v in self._repr_fields().items()]
        parts += [f"{k}={_describe(v)}" for k, v in self._headline().items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_html_(self) -> str:
        """A small table of the fields and headline numbers, and the main figure inline as a
        PNG when matplotlib is installed (imported only here)."""
        from .markup import html_table, inline_figure

        rows = {k: _describe(v) for k, v in self._repr_fields().items()}
        rows.update({k: _describe(v) for k, v in self._headline().items()})
        out = html_table(type(self).__name__, rows)
        if hasattr(self, "plot"):
            out += inline_figure(self.plot)
        return out


class Deferred:
    """Values computed together on first need: `compute()` -> dict of field name -> value.

    A result field that is a `DeferredField` may be given a `Deferred` instead of its value;
    the first read of any such field computes them all once, keeps them, and drops `compute`
    (and what it held). `cell_jacobians(keep="full")` hands its norms over this way: what the
    caller pays for is the Jacobians, and the norms only if they are read. `compute` should be
    a `functools.partial` of a module-level function, so that the result stays picklable.
    """

    def __init__(self, compute):
        self._compute = compute
        self._values = None

    def value(self, name: str):
        if self._values is None:
            self._values = self._compute()
            self._compute = None
        return self._values[name]


class DeferredField:
    """A frozen-dataclass field that accepts a `Deferred` and reads as its value (computed once,
    then stored on the instance): reading, `==`, `to_dict()`, pickling and `repr` see an
    ordinary tensor. No default: the class-level read raises AttributeError, which is how
    dataclasses learns that a descriptor field has none."""

    def __set_name__(self, owner, name: str):
        self.name = name
        self.slot = "_value_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            raise AttributeError(self.name)
        v = obj.__dict__[self.slot]
        if isinstance(v, Deferred):
            v = v.value(self.name)
            obj.__dict__[self.slot] = v  # a frozen instance: its __dict__ holds the value
        return v

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


def highway_energy_share(total: torch.Tensor, direct: torch.Tensor) -> torch.Tensor:
    """‖D‖²_F / (‖D‖²_F + ‖J − D‖²_F) with D = diag(direct), for J `total` (..., N, N) and
    `direct` (..., N), in float64; nan only where J = 0 (or J is non-finite).

    Both norms are taken of J/s and D/s with s = the largest |entry| of D and J − D: the share
    is scale-free, and squaring the unscaled entries would underflow to 0/0 once ‖J‖ ≲ 1e−162
    (a long span), although the share itself is well defined there.
    """
    total = total.to(torch.float64)
    direct = direct.to(torch.float64)
    rest = total - torch.diag_embed(direct)
    s = torch.maximum(direct.abs().amax(-1), rest.abs().amax(dim=(-2, -1)))
    safe = torch.where(s > 0, s, torch.ones_like(s))
    d2 = ((direct / safe.unsqueeze(-1)) ** 2).sum(-1)
    rest2 = ((rest / safe[..., None, None]) ** 2).sum(dim=(-2, -1))
    ok = (s > 0) & torch.isfinite(s)
    return torch.where(ok, d2 / torch.where(ok, d2 + rest2, torch.ones_like(d2)),
                       torch.full_like(d2, math.nan))


def fit_decay_rate(norms: torch.Tensor) -> float:
    """Least-squares per-step decay rate r of norms over distance k: norm_k ≈ A·exp(−r·k).

    `norms` is indexed by distance k = 0, 1, ... Points that are exactly zero (an underflowed
    gradient) cannot enter a log-linear fit and are left out of it; if any norm is non-finite
    the rate is nan. Fewer than two positive points give nan.
    """
    n = norms.to(torch.float64)
    if not torch.isfinite(n).all():
        return math.nan
    k = torch.arange(len(n), dtype=torch.float64)
    keep = n > 0
    if int(keep.sum()) < 2:
        return math.nan
    k, y = k[keep], n[keep].log()
    kc = k - k.mean()
    slope = float((kc * (y - y.mean())).sum() / (kc * kc).sum())
    return -slope


def half_life_from_rate(rate: float) -> float:
    """Steps for the gradient to halve at a per-step decay rate: ln 2 / rate (inf if rate ≤ 0)."""
    if math.isnan(rate):
        return math.nan
    return math.log(2) / rate if rate > 0 else math.inf


def effective_memory(norms, threshold: float = 0.01) -> int:
    """How many timesteps carry a gradient norm above `threshold` × the largest one.

    The classic LSTM gradient-flow analysis's definition of effective memory length. Raises
    ValueError on non-finite norms (they cannot be ranked against a maximum) and on a threshold
    outside (0, 1].

    Example:
        >>> effective_memory(torch.tensor([1.0, 0.5, 0.001]), threshold=0.01)
        2
    """
    n = torch.as_tensor(norms, dtype=torch.float64)
    if n.dim() != 1 or n.numel() == 0:
        raise ValueError(f"norms must be a non-empty 1-D sequence; got shape {tuple(n.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    bad = int((~torch.isfinite(n)).sum())
    if bad:
        raise ValueError(f"norms contain {bad} non-finite value(s) (NaN/Inf); effective memory is "
                         "undefined")
    top = float(n.max())
    if top <= 0:
        return 0
    return int((n / top > threshold).sum())


@dataclass(frozen=True, eq=False, repr=False)
class GradientProfile(Result):
    """Per-sample, per-timestep input-gradient norms ‖∂L_s/∂x_{s,t}‖.

    Attributes:
        per_sample: (S, T) float64: sample s, timestep t (t = T−1 is the output step for
            loss="last"); 0 past the end of a packed sequence.
        loss: the loss used ("last", "all" or "custom").
        nonfinite_inputs, nonfinite_grads: counts of NaN/Inf entries seen (never dropped: they
            make the affected norms non-finite and the summaries nan).
        config: how it was measured (seq_len, samples, seed, dtype, device, site).
        lengths: (S,) int64 steps of each sequence (packed or padded inputs), or None when all
            have T. Steps past a sequence's end are not measured: they are left out of every
            mean, and distances are counted from each sequence's own last step.
        site: where the gradient was measured: "input" or a submodule name.
    """

    per_sample: torch.Tensor
    loss: str = "last"
    nonfinite_inputs: int = 0
    nonfinite_grads: int = 0
    config: dict = field(default_factory=dict)
    lengths: torch.Tensor | None = None
    site: str = "input"

    def _valid(self) -> torch.Tensor:
        """(S, T) bool: steps inside each sequence."""
        S, T = self.per_sample.shape
        if self.lengths is None:
            return torch.ones(S, T, dtype=torch.bool)
        return torch.arange(T).unsqueeze(0) < self.lengths.unsqueeze(1)

    def _aligned(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, T) norms indexed by distance k from each sequence's own last step, and the mask
        of distances that sequence has."""
        if self.lengths is None:
            return self.per_sample.flip(1), self._valid()
        S, T = self.per_sample.shape
        k = torch.arange(T).unsqueeze(0)
        idx = (self.lengths.unsqueeze(1) - 1 - k).clamp_min(0)
        return self.per_sample.gather(1, idx), k < self.lengths.unsqueeze(1)

    @staticmethod
    def _masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = mask.sum(0)
        total = torch.where(mask, v, torch.zeros_like(v)).sum(0)
        return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, math.nan))

    @property
    def norms(self) -> torch.Tensor:
        """(T,) mean norm over samples, indexed by timestep (over the sequences that have it)."""
        if self.lengths is None:
            return self.per_sample.mean(0)
        return self._masked_mean(self.per_sample, self._valid())

    @property
    def std(self) -> torch.Tensor:
        """(T,) standard deviation over samples (0 for a single sample)."""
        if self.per_sample.shape[0] < 2:
            return torch.zeros_like(self.norms)
        if self.lengths is None:
            return self.per_sample.std(0)
        mask = self._valid()
        mean = self.norms
        dev = torch.where(mask, (self.per_sample - mean) ** 2, torch.zeros_like(self.per_sample))
        n = mask.sum(0)
        return (dev.sum(0) / (n - 1).clamp_min(1)).sqrt()

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.per_sample).all())

    def by_distance(self) -> torch.Tensor:
        """(T,) mean norms indexed by distance k = T−1−t steps before the output step (for
        sequences of different lengths, before each sequence's own last step)."""
        v, mask = self._aligned()
        if self.lengths is None:
            return v.mean(0)
        return self._masked_mean(v, mask)

    def underflow(self) -> tuple[str, float, int, int | None] | None:
        """Where the mean gradient falls below its dtype's smallest normal number (autograd's
        gradients lose digits there, then read exactly 0: what training receives, not a
        measurement failing): (dtype name, that number, first distance below it, first
        distance at exactly 0 or None); None if it never does or the dtype is not recorded."""
        name = self.config.get("dtype")
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            return None
        tiny = torch.finfo(dtype).tiny
        nd = self.by_distance()
        below = (nd < tiny).nonzero()
        if not len(below):
            return None
        zero = (nd == 0).nonzero()
        return str(name), tiny, int(below[0]), int(zero[0]) if len(zero) else None

    def std_by_distance(self) -> torch.Tensor:
        """(T,) standard deviation over samples at each distance (0 for a single sample)."""
        v, mask = self._aligned()
        if v.shape[0] < 2:
            return torch.zeros(v.shape[1], dtype=v.dtype)
        mean = self._masked_mean(v, mask)
        dev = torch.where(mask, (v - mean) ** 2, torch.zeros_like(v))
        return (dev.sum(0) / (mask.sum(0) - 1).clamp_min(1)).sqrt()

    def _measured_by_distance(self) -> torch.Tensor:
        """`by_distance()` cut to the distances some sequence has: with `lengths` all shorter
        than T, the distances past the longest sequence hold no measurement (nan)."""
        bd = self.by_distance()
        if self.lengths is None or self.lengths.numel() == 0:
            return bd
        return bd[:max(int(self.lengths.max()), 1)]

    def decay_ratio(self) -> float:
        """Mean norm at the farthest step over the mean norm at the output step: the first
        timestep over the last, with no epsilon.

        A gradient that vanished entirely at the last step gives inf (0 at both ends gives nan);
        non-finite norms give nan. Values ≪ 1 mean the early timesteps receive far less gradient.
        """
        bd = self._measured_by_distance()
        first, last = float(bd[-1]), float(bd[0])
        if not (math.isfinite(first) and math.isfinite(last)):
            return math.nan
        if last == 0:
            return math.nan if first == 0 else math.inf
        return first / last

    def decay_rate(self) -> float:
        """Fitted per-step decay rate r: norm at distance k ≈ A·exp(−r·k) (r > 0 decays)."""
        return fit_decay_rate(self._measured_by_distance())

    def half_life(self) -> float:
        """Steps over which the gradient halves: ln 2 / decay_rate (inf if it does not decay)."""
        return half_life_from_rate(self.decay_rate())

    def effective_memory(self, threshold: float = 0.01) -> int | None:
        """Timesteps with a mean norm above threshold × max; None if any norm is non-finite."""
        bd = self._measured_by_distance()
        if not self.finite or not bool(torch.isfinite(bd).all()):  # a mean can overflow
            return None
        return effective_memory(bd, threshold)

    def summary(self, threshold: float = 0.01) -> dict:
        return {"decay_ratio": self.decay_ratio(), "decay_rate": self.decay_rate(),
                "half_life": self.half_life(),
                "effective_memory": self.effective_memory(threshold),
                "seq_len": int(self.per_sample.shape[1]),
                "nonfinite_grads": self.nonfinite_grads}

    def _headline(self) -> dict:
        return {"decay_rate": self.decay_rate(), "half_life": self.half_life(),
                "effective_memory": self.effective_memory()}

    def to_dict(self) -> dict:
        """JSON-safe fields; `norms`, `by_distance` and the summary numbers are written for a
        reader of the file and recomputed, not read, by `from_dict`."""
        s = self.summary()
        return {"per_sample": encode_tensor(self.per_sample), "loss": self.loss,
                "nonfinite_inputs": self.nonfinite_inputs,
                "nonfinite_grads": self.nonfinite_grads, "config": encode_value(self.config),
                "lengths": None if self.lengths is None else encode_tensor(self.lengths),
                "site": self.site,
                "norms": encode_tensor(self.norms),
                "by_distance": encode_tensor(self.by_distance()),
                **{k: encode_value(v) for k, v in s.items()}}

    @classmethod
    def from_dict(cls, d, where: str = "GradientProfile") -> "GradientProfile":
        f = d if isinstance(d, Fields) else Fields(d, where)
        per_sample = f.tensor("per_sample", F64, 2)
        lengths = f.tensor("lengths", I64, 1, optional=True)
        _check_lengths(f, lengths, per_sample.shape[0], per_sample.shape[1])
        return cls(per_sample, f.str("loss"), f.int("nonfinite_inputs", low=0),
                   f.int("nonfinite_grads", low=0), f.plain("config"), lengths,
                   f.str("site"))

    def plot(self, ax=None, log: bool = False, label: str | None = None):
        """Mean norm vs distance from the output step (± 1 std band). Returns the figure."""
        from . import plotting

        return plotting.plot_profiles({label or "model": self}, ax=ax, log=log)


@dataclass(frozen=True, eq=False, repr=False)
class LagProfile(Result):
    """Lag-resolved gradient flow: per-sample norms ‖∂ℓ_t/∂x_s‖ for loss positions t.

    Attributes:
        per_sample: (S, P, T) float64: sample, loss position p (step `positions[p]`), step s
            of the measured site. Entries with s > t (the future of the loss step, non-zero
            only for bidirectional or non-causal models) are kept but not summarised.
        positions: (P,) int64 loss steps t.
        lengths: (S,) steps of each sequence (packed inputs) or None; positions and steps past
            a sequence's end are not measured.
        site: "input" or the submodule measured at.
        nonfinite: NaN/Inf norms seen (they make the summaries nan).
        config: how it was measured.
    """

    per_sample: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor | None = None
    site: str = "input"
    nonfinite: int = 0
    config: dict = field(default_factory=dict)

    def lag_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, P, K) norms indexed by lag k (step s = t_p − k), and the mask of the lags that
        exist (t_p − k ≥ 0 and t_p inside the sequence); K = max position + 1."""
        S, P, T = self.per_sample.shape
        K = int(self.positions.max()) + 1
        k = torch.arange(K)
        src = self.positions.unsqueeze(1) - k.unsqueeze(0)  # (P, K): step s = t − k
        exists = (src >= 0).unsqueeze(0).expand(S, P, K)
        if self.lengths is not None:
            inside = self.positions.unsqueeze(0) < self.lengths.unsqueeze(1)  # (S, P)
            exists = exists & inside.unsqueeze(-1)
        idx = src.clamp_min(0).unsqueeze(0).expand(S, P, K)
        return self.per_sample.gather(2, idx), exists

    def by_lag(self) -> torch.Tensor:
        """(K,) mean of ‖∂ℓ_t/∂x_{t−k}‖ over samples and loss positions at each lag k (a large
        lag averages over the positions far enough from the start)."""
        v, exists = self.lag_table()
        n = exists.sum((0, 1))
        total = torch.where(exists, v, torch.zeros_like(v)).sum((0, 1))
        return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, math.nan))

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.per_sample).all())

    def decay_rate(self) -> float:
        """Fitted per-step decay rate r over lags: norm at lag k ≈ A·exp(−r·k)."""
        return fit_decay_rate(self.by_lag())

    def half_life(self) -> float:
        return half_life_from_rate(self.decay_rate())

    def effective_memory(self, threshold: float = 0.01) -> int | None:
        """Lags whose mean norm is above threshold × the largest; None if non-finite."""
        bl = self.by_lag()
        if not torch.isfinite(bl).all():
            return None
        return effective_memory(bl, threshold)

    def summary(self, threshold: float = 0.01) -> dict:
        return {"decay_rate": self.decay_rate(), "half_life": self.half_life(),
                "effective_memory": self.effective_memory(threshold),
                "n_positions": int(self.positions.numel()),
                "max_lag": int(self.positions.max()),
                "nonfinite": self.nonfinite}

    def _headline(self) -> dict:
        s = self.summary()
        return {k: s[k] for k in ("decay_rate", "half_life", "effective_memory")}

    def to_dict(self) -> dict:
        """JSON-safe fields; `by_lag` and the summary numbers are written for a reader of the
        file and recomputed, not read, by `from_dict`."""
        s = self.summary()
        return {"per_sample": encode_tensor(self.per_sample),
                "positions": encode_tensor(self.positions),
                "lengths": None if self.lengths is None else encode_tensor(self.lengths),
                "site": self.site, "nonfinite": self.nonfinite,
                "config": encode_value(self.config),
                "by_lag": encode_tensor(self.by_lag()),
                **{k: encode_value(v) for k, v in s.items()}}

    @classmethod
    def from_dict(cls, d, where: str = "LagProfile") -> "LagProfile":
        f = d if isinstance(d, Fields) else Fields(d, where)
        per_sample = f.tensor("per_sample", F64, 3)
        positions = f.tensor("positions", I64, 1)
        S, P, T = per_sample.shape
        if positions.shape != (P,) or P == 0 or int(positions.min()) < 0 \
                or int(positions.max()) >= T:
            raise _shape_error(f, "positions", f"{P} steps in [0, {T})", positions)
        lengths = f.tensor("lengths", I64, 1, optional=True)
        _check_lengths(f, lengths, S, T)
        return cls(per_sample, positions, lengths, f.str("site"), f.int("nonfinite", low=0),
                   f.plain("config"))

    def plot(self, ax=None, log: bool = True, label: str | None = None):
        """Mean ‖∂ℓ_t/∂x_{t−k}‖ against lag k. Returns the figure."""
        from . import plotting

        return plotting.plot_lag_profile({label or self.site: self}, ax=ax, log=log)


SUMMARY_HEADERS = {"model": "model", "decay_ratio": "decay ratio (first/last)",
                   "decay_rate": "decay rate per step", "half_life": "half-life (steps)",
                   "effective_memory": "effective memory (steps)"}
"""The summary table's columns and their headers: the terminal, --json and report.html."""


@dataclass(frozen=True, eq=False, repr=False)
class Comparison(Result):
    """Gradient profiles of several models measured on the same inputs."""

    profiles: dict[str, GradientProfile]

    def table(self, threshold: float = 0.01) -> list[dict]:
        """Rows: model, decay_ratio, decay_rate, half_life, effective_memory (SUMMARY_HEADERS)."""
        rows = []
        for name, p in self.profiles.items():
            s = p.summary(threshold)
            rows.append({"model": name, **{k: s[k] for k in SUMMARY_HEADERS if k != "model"}})
        return rows

    def __str__(self) -> str:
        text = format_table(self.table(), SUMMARY_HEADERS)
        # a slowly decaying profile's half-life lies past the steps it was read on; each is
        # named with its own length (profiles of different lengths can be compared)
        beyond = [f"{name}: {p.per_sample.shape[1]} steps"
                  for name, p in self.profiles.items()
                  if math.isfinite(h := p.half_life()) and h > p.per_sample.shape[1]]
        if beyond:
            text += (f"\nhalf-life past the steps measured ({', '.join(beyond)}): "
                     "extrapolated from the fitted per-step decay rate")
        return text

    def _headline(self) -> dict:
        return {f"{name}.half_life": p.half_life() for name, p in self.profiles.items()}

    def to_dict(self) -> dict:
        """The profiles; `table` is written for a reader of the file, not read back."""
        return {"profiles": {k: p.to_dict() for k, p in self.profiles.items()},
                "table": encode_value(self.table())}

    @classmethod
    def from_dict(cls, d, where: str = "Comparison") -> "Comparison":
        f = d if isinstance(d, Fields) else Fields(d, where)
        return cls({k: GradientProfile.from_dict(v) for k, v in f.mapping("profiles").items()})

    def plot(self, log: bool | None = None, axes=None):
        """The classic analysis's gradient-decay figure done right: linear and log panels, x =
        distance from the output.

        log=None draws both panels side by side; True or False draws one.
        """
        from . import plotting

        return plotting.plot_comparison(self.profiles, log=log, axes=axes)


def _shape_error(f: Fields, key: str, expected: str, got: torch.Tensor):
    from .codec import SchemaError

    return SchemaError(f"{f.at(key)} must be {expected}; got shape {tuple(got.shape)}")


def _check_lengths(f: Fields, lengths, S: int, T: int) -> None:
    """(S,) sequence lengths, each in [1, T], or None."""
    from .codec import SchemaError

    if lengths is None:
        return
    if lengths.shape != (S,):
        raise _shape_error(f, "lengths", f"({S},)", lengths)
    if S and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise SchemaError(f"{f.at('lengths')} must hold lengths in [1, {T}]; got "
                          f"{int(lengths.min())}..{int(lengths.max())}")


def format_number(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3g}"
    return str(v)


def format_table(rows: list[dict], headers: dict[str, str]) -> str:
    """Plain aligned text table: first column left-aligned, numbers right-aligned."""
    cells = [[headers[k] for k in headers]]
    cells += [[format_number(r[k]) for k in headers] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True, eq=False, repr=False)
class GateLayerStats(Result):
    """Statistics of the retain gate (LSTM forget f, GRU retain z) of one layer and direction.

    Attributes:
        mean: mean gate value over batch, time and units.
        quantiles: {q: value} for q in 0.05, 0.25, 0.5, 0.75, 0.95.
        hist: (bins,) fraction of gate values per bin over [0, 1]; edges (bins+1,).
        saturation: fractions of values < 0.1, > 0.9, > 0.99 (and < 0.01).
        unit_mean: (H,) mean gate value per unit; memory_time (H,) = 1 / (1 − unit_mean), the
            time constant in steps of a unit whose gate held its mean value (inf at 1).
    """

    layer: int
    direction: int
    gate: str
    mean: float
    quantiles: dict
    hist: torch.Tensor
    edges: torch.Tensor
    saturation: dict
    unit_mean: torch.Tensor
    memory_time: torch.Tensor
    nonfinite: int = 0

    def _headline(self) -> dict:
        return {"median_memory_time": float(self.memory_time.median())}

    def _repr_fields(self) -> dict:
        return {"layer": self.layer, "direction": self.direction, "gate": self.gate,
                "mean": self.mean, "unit_mean": self.unit_mean}

    def to_dict(self) -> dict:
        return {"layer": self.layer, "direction": self.direction, "gate": self.gate,
                "mean": encode_float(self.mean),
                "quantiles": {repr(float(k)): encode_float(v) for k, v in self.quantiles.items()},
                "hist": encode_tensor(self.hist), "edges": encode_tensor(self.edges),
                "saturation": {k: encode_float(v) for k, v in self.saturation.items()},
                "unit_mean": encode_tensor(self.unit_mean),
                "memory_time": encode_tensor(self.memory_time), "nonfinite": self.nonfinite}

    @classmethod
    def from_dict(cls, d, where: str = "GateLayerStats") -> "GateLayerStats":
        from .codec import SchemaError, decode_float

        f = d if isinstance(d, Fields) else Fields(d, where)
        q = f.obj("quantiles")
        quantiles = {}
        for k, v in q.d.items():
            try:
                key = float(k)
            except ValueError:
                raise SchemaError(f"{q.where} keys must be quantile levels such as '0.5'; "
                                  f"got {k[:40]!r}") from None
            quantiles[key] = decode_float(v, q.at(k))
        sat = f.obj("saturation")
        saturation = {k: decode_float(v, sat.at(k)) for k, v in sat.d.items()}
        for need, what in ((0.5, quantiles), ("<0.1", saturation), (">0.9", saturation),
                           (">0.99", saturation)):
            if need not in what:
                owner = q if what is quantiles else sat
                raise SchemaError(f"{owner.at(str(need))} is missing; expected a number")
        hist, edges = f.tensor("hist", F64, 1), f.tensor("edges", F64, 1)
        if edges.shape[0] != hist.shape[0] + 1:
            raise _shape_error(f, "edges", f"{hist.shape[0] + 1} bin edges", edges)
        unit_mean, memory_time = f.tensor("unit_mean", F64, 1), f.tensor("memory_time", F64, 1)
        if memory_time.shape != unit_mean.shape or memory_time.numel() == 0:
            raise _shape_error(f, "memory_time", f"one value per unit ({unit_mean.shape[0]})",
                               memory_time)
        return cls(f.int("layer", low=0), f.int("direction", low=0), f.str("gate"),
                   f.float("mean"), quantiles, hist, edges, saturation, unit_mean, memory_time,
                   f.int("nonfinite", low=0))


@dataclass(frozen=True, eq=False, repr=False)
class GateStats(Result):
    """Retain-gate statistics for every layer and direction of a module."""

    kind: str
    layers: tuple[GateLayerStats, ...]

    def __str__(self) -> str:
        rows = [{"layer": f"l{s.layer}d{s.direction} {s.gate}", "mean": s.mean,
                 "median": s.quantiles[0.5], "lt01": s.saturation["<0.1"],
                 "gt09": s.saturation[">0.9"], "gt099": s.saturation[">0.99"],
                 "tau": float(s.memory_time.median())} for s in self.layers]
        return format_table(rows, {"layer": "layer/dir gate", "mean": "mean", "median": "median",
                                   "lt01": "<0.1", "gt09": ">0.9", "gt099": ">0.99",
                                   "tau": "median memory time"})

    def _headline(self) -> dict:
        return {f"l{s.layer}d{s.direction}.mean_{s.gate}": s.mean for s in self.layers[:3]}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layers": [s.to_dict() for s in self.layers]}

    @classmethod
    def from_dict(cls, d, where: str = "GateStats") -> "GateStats":
        f = d if isinstance(d, Fields) else Fields(d, where)
        return cls(f.str("kind"), tuple(GateLayerStats.from_dict(x)
                                        for x in f.objects("layers")))

    def plot(self, axes=None, label: str = ""):
        """Gate-value histograms and memory-time distributions. Returns the figure."""
        from . import plotting

        return plotting.plot_gate_stats(self, axes=axes, label=label)


@dataclass(frozen=True, eq=False, repr=False)
class DecayTable(Result):
    """The classic analysis's gradient-decay table: f^L for each forget value f and length L.

    rows: dicts with forget, length, factor = f**L (exact, in float64) and memory_time
    1 / (1 − f).
    """

    rows: tuple[dict, ...]

    def __str__(self) -> str:
        return format_table(list(self.rows), {"forget": "forget f", "length": "length L",
                                              "factor": "f^L", "memory_time": "1/(1-f)"})

    def _repr_fields(self) -> dict:
        return {"rows": self.rows}

    def to_dict(self) -> dict:
        return {"rows": [{k: encode_value(v) for k, v in r.items()} for r in self.rows]}

    @classmethod
    def from_dict(cls, d, where: str = "DecayTable") -> "DecayTable":
        f = d if isinstance(d, Fields) else Fields(d, where)
        rows = tuple({"forget": r.float("forget"), "length": r.int("length", low=0),
                      "factor": r.float("factor"), "memory_time": r.float("memory_time")}
                     for r in f.objects("rows"))
        return cls(rows)


@dataclass(frozen=True, eq=False, repr=False)
class StateGradientLayer(Result):
    """Total state gradients of one layer and direction, in input-position order.

    h: (B, T) ‖∂L/∂h_t‖; c: (B, T) ‖∂L/∂c_t‖ (LSTM) or None; h_full (B, T, H_out) and c_full
    (B, T, H) with keep="full", else None. For a PackedSequence, positions past a sequence's
    end are not steps of it and hold 0 (as in `gradient_profile`); the lengths are the
    input's.
    """

    h: torch.Tensor
    c: torch.Tensor | None
    h_full: torch.Tensor | None = None
    c_full: torch.Tensor | None = None
    nonfinite: int = 0

    def _headline(self) -> dict:
        return {"mean_h_first": float(self.h[:, 0].mean()),
                "mean_h_last": float(self.h[:, -1].mean())} if self.h.numel() else {}

    def to_dict(self) -> dict:
        opt = lambda t: None if t is None else encode_tensor(t)  # noqa: E731
        return {"h": encode_tensor(self.h), "c": opt(self.c), "h_full": opt(self.h_full),
                "c_full": opt(self.c_full), "nonfinite": self.nonfinite}

    @classmethod
    def from_dict(cls, d, where: str = "StateGradientLayer") -> "StateGradientLayer":
        f = d if isinstance(d, Fields) else Fields(d, where)
        h = f.tensor("h", F64, 2)
        c = f.tensor("c", F64, 2, optional=True)
        if c is not None and c.shape != h.shape:
            raise _shape_error(f, "c", f"shaped like h {tuple(h.shape)}", c)
        return cls(h, c, f.tensor("h_full", F64, 3, optional=True),
                   f.tensor("c_full", F64, 3, optional=True), f.int("nonfinite", low=0))


@dataclass(frozen=True, eq=False, repr=False)
class StateGradients(Result):
    """layers[l][d]: `StateGradientLayer` for layer l, direction d."""

    layers: tuple[tuple[StateGradientLayer, ...], ...]
    loss: str = "last"

    def _repr_fields(self) -> dict:
        first = self.layers[0][0] if self.layers and self.layers[0] else None
        return {"loss": self.loss, "layers": len(self.layers),
                "directions": len(self.layers[0]) if self.layers else 0,
                **({"h": first.h} if first is not None else {})}

    def to_dict(self) -> dict:
        return {"loss": self.loss,
                "layers": [[d.to_dict() for d in dirs] for dirs in self.layers]}

    @classmethod
    def from_dict(cls, d, where: str = "StateGradients") -> "StateGradients":
        from .codec import SchemaError

        f = d if isinstance(d, Fields) else Fields(d, where)
        layers = []
        for i, dirs in enumerate(f.list("layers")):
            if not isinstance(dirs, list):
                raise SchemaError(f"{f.at('layers')}[{i}] must be a list of directions")
            layers.append(tuple(StateGradientLayer.from_dict(x, f"{f.at('layers')}[{i}][{j}]")
                                for j, x in enumerate(dirs)))
        return cls(tuple(layers), f.str("loss"))

    def plot(self, ax=None, log: bool = True):
        from . import plotting

        return plotting.plot_state_gradients(self, ax=ax, log=log)


@dataclass(frozen=True, eq=False, repr=False)
class StepJacobians(Result):
    """One-step Jacobians ∂s_n/∂s_{n−1} for processing steps n = 0..T−1.

    Attributes:
        direct: (B, T, N) the highway diagonal (LSTM f_n, GRU z_n) or None.
        indirect: (B, T, N, N) everything else, or None with keep="norms".
        positions: (T,) input position read at step n.
        valid: (B, T) bool in processing order, True where sample b's sequence has step n
            (packed inputs); None when every step is valid. Invalid steps are nan.
        nonfinite: (B,) bool, samples whose one-step Jacobians hold a NaN/Inf at a valid
            step; every value of such a sample is nan. None means none.
        indirect_spectral: (B, T) float64 ‖indirect‖₂ per sample and step, computed while
            streaming with keep="norms"; None with keep="full" (`summary` computes it).
    """

    direct: torch.Tensor | None
    indirect: torch.Tensor | None
    state: str
    kind: str
    layer: int
    direction: int
    positions: torch.Tensor
    valid: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None
    indirect_spectral: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """(B, T, N, N) = diag(direct) + indirect (keep="full" only)."""
        if self.indirect is None:
            raise ValueError("these step Jacobians were computed with keep='norms' and hold no "
                             "(B, T, N, N) matrices; call step_jacobians(..., keep='full')")
        if self.direct is None:
            return self.indirect
        return torch.diag_embed(self.direct) + self.indirect

    def _counted(self, B: int, T: int) -> torch.Tensor:
        """(B, T) bool: valid steps of finite samples, the entries every summary averages."""
        mask = torch.ones(B, T, dtype=torch.bool) if self.valid is None else self.valid.clone()
        if self.nonfinite is not None:
            mask &= ~self.nonfinite.unsqueeze(1)
        return mask

    def summary(self) -> dict:
        """Batch means per step n over the samples that have step n and are finite:
        `indirect_spectral` (T,) mean ‖indirect‖₂, `direct_mean` (T,) mean |direct| over
        units (with a highway); `samples` (B) and `nonfinite_samples`, the number of samples
        left out because their Jacobians are non-finite. A step no counted sample has is nan.

        Memory: the spectral norms are taken a chunk of steps at a time, never on a float64
        copy of all (B, T, N, N) matrices.
        """
        spec = self.indirect_spectral
        if spec is None:
            spec = spectral_norms(self.indirect)
        B, T = spec.shape
        mask = self._counted(B, T)
        out = {"indirect_spectral": masked_batch_mean(spec, mask)}
        if self.direct is not None:
            out["direct_mean"] = masked_batch_mean(self.direct.abs().double().mean(2), mask)
        out["samples"] = B
        out["nonfinite_samples"] = 0 if self.nonfinite is None else int(self.nonfinite.sum())
        return out

    def _repr_fields(self) -> dict:
        return {k: v for k, v in super()._repr_fields().items() if k != "positions"}

    def to_dict(self) -> dict:
        return _jacobian_fields_to_dict(self, ("direct", "indirect", "indirect_spectral"))

    @classmethod
    def from_dict(cls, d, where: str = "StepJacobians") -> "StepJacobians":
        f = d if isinstance(d, Fields) else Fields(d, where)
        common = _jacobian_common(f)
        B, T = common.pop("_BT")
        direct = f.tensor("direct", F64, 3, optional=True)
        indirect = f.tensor("indirect", F64, 4, optional=True)
        spec = f.tensor("indirect_spectral", F64, 2, optional=True)
        _check_lead(f, "direct", direct, B, T)
        _check_lead(f, "indirect", indirect, B, T)
        _check_lead(f, "indirect_spectral", spec, B, T)
        return cls(direct, indirect, indirect_spectral=spec, **common)


def _jacobian_fields_to_dict(r, tensors: tuple) -> dict:
    """The fields StepJacobians, CellJacobians and JacobianNorms share, plus `tensors`."""
    opt = lambda t: None if t is None else encode_tensor(t)  # noqa: E731
    return {"state": r.state, "kind": r.kind, "layer": r.layer, "direction": r.direction,
            "positions": encode_tensor(r.positions), "valid": opt(r.valid),
            "nonfinite": opt(r.nonfinite), **{k: opt(getattr(r, k)) for k in tensors}}


def _jacobian_common(f: Fields) -> dict:
    """state, kind, layer, direction, positions, valid, nonfinite, checked against each other;
    "_BT" is (B, T) when `valid` or `nonfinite` tells B (else B is None)."""
    positions = f.tensor("positions", I64, 1)
    T = positions.shape[0]
    valid = f.tensor("valid", BOOL, 2, optional=True)
    nonfinite = f.tensor("nonfinite", BOOL, 1, optional=True)
    B = valid.shape[0] if valid is not None else (
        nonfinite.shape[0] if nonfinite is not None else None)
    if valid is not None and valid.shape[1] != T:
        raise _shape_error(f, "valid", f"(B, T={T})", valid)
    if nonfinite is not None and nonfinite.shape != (B,):
        raise _shape_error(f, "nonfinite", f"({B},)", nonfinite)
    return {"state": f.str("state"), "kind": f.str("kind"), "layer": f.int("layer", low=0),
            "direction": f.int("direction", low=0), "positions": positions, "valid": valid,
            "nonfinite": nonfinite, "_BT": (B, T)}


def _check_lead(f: Fields, key: str, t, B, T) -> None:
    """t's leading (B, T) dims agree with the other fields (B None: any)."""
    if t is None:
        return
    if t.shape[1] != T or (B is not None and t.shape[0] != B):
        raise _shape_error(f, key, f"(B={B if B is not None else 'B'}, T={T}, ...)", t)


def _jacobian_tensors(f: Fields, optional: dict) -> tuple[dict, dict, int, int]:
    """The tensors of a span-Jacobian result read from `f`: "spectral" and "frobenius" (B, T)
    plus the optional fields named with their dimension counts, each checked to lead with
    (B, T); with the common fields of `_jacobian_common`, B and T."""
    common = _jacobian_common(f)
    B, T = common.pop("_BT")
    spectral = f.tensor("spectral", F64, 2)
    B = spectral.shape[0] if B is None else B
    out = {"spectral": spectral, "frobenius": f.tensor("frobenius", F64, 2)}
    out.update({k: f.tensor(k, F64, dims, optional=True) for k, dims in optional.items()})
    for k, t in out.items():
        _check_lead(f, k, t, B, T)
    return out, common, B, T


def masked_batch_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T,) mean over dim 0 of (B, T) values where `mask`; nan where no entry is counted."""
    n = mask.sum(0)
    total = torch.where(mask, v, torch.zeros_like(v)).sum(0)
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, math.nan))


@dataclass(frozen=True, eq=False, repr=False)
class CellJacobians(Result):
    """J[b, n] = ∂s_{end}/∂s_n, n = 0..T−1 in processing order, with `end` the last step of
    sample b's recurrence (T−1, or its own last step for a packed sequence; J = I there).

    Attributes:
        total: (B, T, N, N) or None with keep="norms".
        direct: (B, T, N) the highway alone: ∏_{m=n+1}^{end} f_m (LSTM "c") or z_m (GRU);
            None where no diagonal highway exists (vanilla RNN, LSTM "h"/"full", custom).
        spectral, frobenius: (B, T) float64 norms of J. With keep="full" they are computed
            from `total` on first read (`DeferredField`), then kept.
        share: (B, T) highway share, see `highway_share` (computed like the norms).
        positions: (T,) input position of step n (reversed for direction 1).
        valid: (B, T) bool in processing order, True where sample b's sequence has step n
            (packed inputs); None when all steps are valid. Steps past a sequence's end are
            not measured: nan in every per-sample field, left out of `by_distance`.
        nonfinite: (B,) bool, samples whose Jacobians hold a NaN/Inf (from non-finite inputs,
            states or weights); every value of such a sample is nan and `by_distance` leaves
            it out. None means none.
    """

    total: torch.Tensor | None
    direct: torch.Tensor | None
    spectral: torch.Tensor = DeferredField()
    frobenius: torch.Tensor = DeferredField()
    share: torch.Tensor | None = DeferredField()
    state: str
    kind: str
    layer: int
    direction: int
    positions: torch.Tensor
    valid: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None

    @property
    def nonfinite_samples(self) -> int:
        """How many samples are non-finite (and left out of the summaries)."""
        return 0 if self.nonfinite is None else int(self.nonfinite.sum())

    def spectral_norm(self) -> torch.Tensor:
        """(B, T) ‖∂s_{end}/∂s_n‖₂."""
        return self.spectral

    def highway_share(self) -> torch.Tensor | None:
        """(B, T) the direct path's share of the Jacobian's energy:

            share = ‖D‖²_F / (‖D‖²_F + ‖J − D‖²_F),   D = diag(direct),

        1 when everything flows through the highway (e.g. W_hh = 0), → 0 when the indirect
        paths dominate. Always in [0, 1]; nan where J = 0 (and at unmeasured steps or
        non-finite samples). None without a highway.
        """
        return self.share

    def by_distance(self) -> dict:
        """Means over the measured samples indexed by distance k = end−n (k = 0 is the
        identity): `spectral`, and with a highway `direct` (mean unit), `direct_spectral`
        (largest unit) and `share`; plus `samples` (B) and `nonfinite_samples` (left out)."""
        if self.direct is None:
            return jacobian_curves(self.spectral, valid=self.valid, nonfinite=self.nonfinite)
        d = self.direct.abs()
        return jacobian_curves(self.spectral, d.mean(-1), d.amax(-1), self.share,
                               valid=self.valid, nonfinite=self.nonfinite)

    def norms(self) -> "JacobianNorms":
        """The per-sample norms and highway summaries alone (what a report draws), without
        the (B, T, N, N) and (B, T, N) tensors."""
        d = None if self.direct is None else self.direct.abs()
        return JacobianNorms(
            spectral=self.spectral, frobenius=self.frobenius,
            direct_mean=None if d is None else d.mean(-1).to(F64),
            direct_max=None if d is None else d.amax(-1).to(F64), share=self.share,
            state=self.state, kind=self.kind, layer=self.layer, direction=self.direction,
            positions=self.positions, valid=self.valid, nonfinite=self.nonfinite)

    def _headline(self) -> dict:
        return _jacobian_headline(self.by_distance())

    def _repr_fields(self) -> dict:
        return {k: v for k, v in super()._repr_fields().items() if k != "positions"}

    def to_dict(self) -> dict:
        return _jacobian_fields_to_dict(self, ("total", "direct", "spectral", "frobenius",
                                               "share"))

    @classmethod
    def from_dict(cls, d, where: str = "CellJacobians") -> "CellJacobians":
        f = d if isinstance(d, Fields) else Fields(d, where)
        out, common, _, _ = _jacobian_tensors(f, {"share": 2, "total": 4, "direct": 3})
        return cls(**out, **common)

    def plot(self, ax=None):
        from . import plotting

        return plotting.plot_cell_jacobians(self, ax=ax)


def _by_distance(v: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """(B, T) per-step values in processing order -> (B, T) indexed by distance k = end_b − n
    from each sample's own last step, and the (B, T) mask of the distances it has."""
    B, T = v.shape
    if valid is None:
        return v.flip(1), torch.ones(B, T, dtype=torch.bool)
    n = torch.arange(T)
    end = torch.where(valid, n, torch.full_like(n, -1)).amax(1)  # (B,) last valid step
    src = end.unsqueeze(1) - n.unsqueeze(0)  # (B, T): step n = end − k
    idx = src.clamp_min(0)
    return v.gather(1, idx), (src >= 0) & valid.gather(1, idx)


def jacobian_curves(spectral, direct_mean=None, direct_max=None, share=None, *, valid=None,
                    nonfinite=None) -> dict:
    """Batch means of (B, T) per-step Jacobian summaries (processing order), reindexed by
    distance k from each sample's last step. Means run over the samples that have distance k
    and are finite (`valid` (B, T), `nonfinite` (B,) as in `CellJacobians`); the share's mean
    also leaves out its nan entries (J = 0). A distance no sample has is nan."""
    B = spectral.shape[0]
    keep = ~nonfinite if nonfinite is not None else torch.ones(B, dtype=torch.bool)
    v, mask = _by_distance(spectral, valid)
    mask = mask & keep.unsqueeze(1)
    out = {"spectral": masked_batch_mean(v, mask)}
    if direct_mean is not None:
        out["direct"] = masked_batch_mean(_by_distance(direct_mean, valid)[0], mask)
        out["direct_spectral"] = masked_batch_mean(_by_distance(direct_max, valid)[0], mask)
        s = _by_distance(share, valid)[0]
        out["share"] = masked_batch_mean(s, mask & ~s.isnan())
    out["samples"] = B
    out["nonfinite_samples"] = int((~keep).sum())
    return out


def _jacobian_headline(curves: dict) -> dict:
    """‖J‖₂ one step back and at the farthest distance, and the highway share one step back."""
    spec = curves["spectral"]
    out = {}
    if spec.numel() > 1:
        out["spectral_k1"] = float(spec[1])
    if spec.numel():
        out[f"spectral_k{spec.numel() - 1}"] = float(spec[-1])
    if "share" in curves and curves["share"].numel() > 1:
        out["share_k1"] = float(curves["share"][1])
    return out


@dataclass(frozen=True, eq=False, repr=False)
class JacobianNorms(Result):
    """What a report keeps of `CellJacobians`: per-sample norms of J[b, n] = ∂s_end/∂s_n and
    the highway's summaries, without the matrices (`CellJacobians.norms()`).

    Attributes:
        spectral, frobenius: (B, T) float64 ‖J‖₂ and ‖J‖_F in processing order.
        direct_mean, direct_max: (B, T) float64 mean and largest |highway| over units, or None
            without a highway.
        share: (B, T) float64 highway energy share, or None.
        state, kind, layer, direction, positions, valid, nonfinite: as in `CellJacobians`.
    """

    spectral: torch.Tensor
    frobenius: torch.Tensor
    direct_mean: torch.Tensor | None
    direct_max: torch.Tensor | None
    share: torch.Tensor | None
    state: str
    kind: str
    layer: int
    direction: int
    positions: torch.Tensor
    valid: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None

    def by_distance(self) -> dict:
        """As `CellJacobians.by_distance`."""
        if self.direct_mean is None:
            return jacobian_curves(self.spectral, valid=self.valid, nonfinite=self.nonfinite)
        return jacobian_curves(self.spectral, self.direct_mean, self.direct_max, self.share,
                               valid=self.valid, nonfinite=self.nonfinite)

    def _headline(self) -> dict:
        return _jacobian_headline(self.by_distance())

    def _repr_fields(self) -> dict:
        return {k: v for k, v in super()._repr_fields().items() if k != "positions"}

    def to_dict(self) -> dict:
        return _jacobian_fields_to_dict(self, ("spectral", "frobenius", "direct_mean",
                                               "direct_max", "share"))

    @classmethod
    def from_dict(cls, d, where: str = "JacobianNorms") -> "JacobianNorms":
        from .codec import SchemaError

        f = d if isinstance(d, Fields) else Fields(d, where)
        out, common, B, T = _jacobian_tensors(f, {"direct_mean": 2, "direct_max": 2,
                                                  "share": 2})
        spectral = out["spectral"]
        for k, t in out.items():
            if t is not None and t.shape != spectral.shape:
                raise _shape_error(f, k, f"shaped like spectral {tuple(spectral.shape)}", t)
        if T == 0 or B == 0:
            raise SchemaError(f"{f.at('spectral')} must hold at least one sample and step")
        highway = [out[k] is None for k in ("direct_mean", "direct_max", "share")]
        if any(highway) and not all(highway):
            raise SchemaError(f"{f.where}: direct_mean, direct_max and share must be given "
                              "together (a highway) or all be null")
        return cls(**out, **common)

    def plot(self, ax=None, share_ax=None, label: str = "", color: str | None = None):
        """Spectral norm (and the highway) against distance. Returns the figure."""
        from . import plotting

        if ax is None:
            fig, (ax, share_ax) = plotting._new_axes(2)
        plotting.plot_jacobian_curves(self.by_distance(), self.state, ax=ax, share_ax=share_ax,
                                      label=label or self.kind, color=color)
        return ax.figure


@dataclass(frozen=True, eq=False, repr=False)
class LyapunovSpectrum(Result):
    """The k largest Lyapunov exponents of a recurrence (natural log per step).

    Attributes:
        exponents: (B, k) float64 sorted descending per sample ((k,) for unbatched inputs);
            a row of nan for a sample whose Jacobians were non-finite or that has no more
            than `warmup` steps.
        layer, direction: which recurrence.
        warmup: steps evolved without being counted.
        state_size: N, the size of the state the exponents describe.
    """

    exponents: torch.Tensor
    layer: int = 0
    direction: int = 0
    warmup: int = 0
    state_size: int = 0

    @property
    def k(self) -> int:
        return int(self.exponents.shape[-1])

    def largest(self) -> torch.Tensor:
        """(B,) (or 0-d) the largest exponent of each sample."""
        return self.exponents[..., 0]

    def finite_samples(self) -> int:
        """Samples whose exponents are finite (counted by `mean_largest`)."""
        return int(torch.isfinite(self.exponents.reshape(-1, self.k)[:, 0]).sum())

    def mean_largest(self) -> float:
        """Mean largest exponent over the samples where it is finite (nan if none is)."""
        top = self.exponents.reshape(-1, self.k)[:, 0]
        ok = torch.isfinite(top)
        return float(top[ok].mean()) if bool(ok.any()) else math.nan

    def _headline(self) -> dict:
        return {"mean_largest": self.mean_largest()}

    def to_dict(self) -> dict:
        return {"exponents": encode_tensor(self.exponents), "layer": self.layer,
                "direction": self.direction, "warmup": self.warmup,
                "state_size": self.state_size}

    @classmethod
    def from_dict(cls, d, where: str = "LyapunovSpectrum") -> "LyapunovSpectrum":
        from .codec import SchemaError

        f = d if isinstance(d, Fields) else Fields(d, where)
        v = f.d.get("exponents")
        dim = 1 if isinstance(v, list) and (not v or not isinstance(v[0], list)) else 2
        exps = f.tensor("exponents", F64, dim)
        if exps.shape[-1] == 0:
            raise SchemaError(f"{f.at('exponents')} must hold at least one exponent")
        return cls(exps, f.int("layer", low=0), f.int("direction", low=0),
                   f.int("warmup", low=0), f.int("state_size", low=0))
