"""Closed forms: the gradient-decay table and memory times."""

from __future__ import annotations

import math

from .results import DecayTable


def memory_time(f: float) -> float:
    """1 / (1 − f): steps a unit with constant retain gate f keeps a perturbation (inf at 1)."""
    if not 0 <= f <= 1:
        raise ValueError(f"memory_time: a gate value must lie in [0, 1]; got {f}")
    return math.inf if f == 1 else 1.0 / (1.0 - f)


def decay_table(forget_values=(0.9, 0.95, 0.99, 0.999), lengths=(100, 500, 1000)) -> DecayTable:
    """The classic LSTM gradient-flow analysis's table: the factor f^L by which a constant forget
    gate f scales the gradient through the cell state over L steps (the direct path alone; exact in
    float64).

    Example:
        >>> t = decay_table((0.5,), (3,))
        >>> t.rows[0]["factor"]
        0.125
    """
    fs, ls = list(forget_values), list(lengths)
    if not fs or not ls:
        raise ValueError("decay_table: forget_values and lengths must be non-empty")
    for f in fs:
        if not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"decay_table: forget values must be numbers in [0, 1]; got {f!r}")
    for n in ls:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"decay_table: lengths must be non-negative ints; got {n!r}")
    rows = tuple({"forget": float(f), "length": n, "factor": float(f) ** n,
                  "memory_time": memory_time(float(f))} for n in ls for f in fs)
    return DecayTable(rows)
