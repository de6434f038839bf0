"""When to measure: plain `step -> bool` callables (cockpit's schedules), and named presets."""

from __future__ import annotations

from collections.abc import Callable

Schedule = Callable[[int], bool]


def every(interval: int, *, offset: int = 0) -> Schedule:
    """True on steps offset, offset + interval, offset + 2·interval, ..."""
    if not isinstance(interval, int) or interval <= 0:
        raise ValueError(f"interval must be a positive int; got {interval!r}")

    def schedule(step: int) -> bool:
        return step >= offset and (step - offset) % interval == 0

    return schedule


def never(step: int) -> bool:
    return False


def as_schedule(spec) -> Schedule:
    """An int n means every n steps (0 or None: never); a callable is used as it is."""
    if spec is None or spec == 0:
        return never
    if isinstance(spec, int) and not isinstance(spec, bool):
        return every(spec)
    if callable(spec):
        return spec
    raise TypeError(f"a schedule is an int (every n steps) or a callable step -> bool; got "
                    f"{type(spec).__name__}")


# Named presets for GradientMonitor(preset=...): cheap statistics every step and the exact replay
# rarely ("cheap"), or everything every step for short debugging runs ("full").
PRESETS = {
    "cheap": {"every": 1, "replay_every": 100},
    "full": {"every": 1, "replay_every": 1},
}
