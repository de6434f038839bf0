"""Every matplotlib call of rnnscope lives here; this module is imported lazily by `.plot()`.

Each function takes result objects (never models), draws on the given axes or a new figure, and
returns the figure.
"""

from __future__ import annotations

import numpy as np

try:
    import matplotlib.pyplot as plt  # picks the non-interactive Agg backend when headless
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("plotting needs matplotlib: pip install 'rnnscope[plot]'") from e


def _new_axes(ncols=1, width=6.0, height=4.2):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def _draw_profiles(ax, profiles: dict, log: bool) -> None:
    for name, p in profiles.items():
        y = p.by_distance().numpy()
        k = np.arange(len(y))
        (line,) = ax.plot(k, y, label=name, lw=1.6)
        if p.per_sample.shape[0] > 1 and not log:
            sd = p.std.flip(0).numpy()
            ax.fill_between(k, np.maximum(y - sd, 0), y + sd, color=line.get_color(), alpha=0.15,
                            lw=0)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("distance from the output step k = T−1−t (steps)")
    ax.set_ylabel("mean ‖∂L/∂x_t‖" + (" (log scale)" if log else ""))
    ax.grid(True, which="both" if log else "major", alpha=0.3)
    ax.legend()


def plot_profiles(profiles: dict, ax=None, log: bool = False):
    """Mean input-gradient norm vs distance from the output (± 1 std band on linear axes)."""
    if ax is None:
        fig, (ax,) = _new_axes()
    fig = ax.figure
    _draw_profiles(ax, profiles, log)
    ax.set_title("Gradient reaching each timestep" + (" (log scale)" if log else ""))
    return fig


def plot_comparison(profiles: dict, log: bool | None = None, axes=None):
    """The seed's comparison figure: linear and log panels side by side (log=None)."""
    modes = [False, True] if log is None else [bool(log)]
    if axes is None:
        fig, axes = _new_axes(len(modes))
    axes = list(np.atleast_1d(axes))
    for ax, lg in zip(axes, modes):
        _draw_profiles(ax, profiles, lg)
        ax.set_title("Gradient flow comparison" + (" (log scale)" if lg else ""))
    fig = axes[0].figure
    fig.tight_layout()
    return fig


def plot_gate_stats(stats, axes=None):
    """Left: retain-gate value histograms; right: per-unit memory time 1/(1−f̄) distributions."""
    if axes is None:
        fig, axes = _new_axes(2)
    ax_h, ax_m = axes
    gname = {"lstm": "forget gate f", "gru": "retain gate z"}.get(stats.kind, "gate")
    for s in stats.layers:
        label = f"layer {s.layer}" + (f" dir {s.direction}" if s.direction else "")
        centers = 0.5 * (s.edges[1:] + s.edges[:-1]).numpy()
        ax_h.step(centers, s.hist.numpy(), where="mid", label=label)
        mt = s.memory_time.numpy()
        mt = np.sort(mt[np.isfinite(mt)])
        if mt.size:
            ax_m.plot(mt, np.arange(1, mt.size + 1) / mt.size, label=label)
    ax_h.set_xlabel(f"{gname} value")
    ax_h.set_ylabel("fraction of gate values")
    ax_h.set_title(f"{gname} distribution")
    ax_h.axvspan(0.99, 1.0, color="red", alpha=0.1, label="saturated (> 0.99)")
    ax_h.legend()
    ax_m.set_xscale("log")
    ax_m.set_xlabel("memory time 1/(1 − mean gate) (steps, log scale)")
    ax_m.set_ylabel("fraction of units ≤ x")
    ax_m.set_title("Per-unit memory time (cumulative)")
    ax_m.grid(True, which="both", alpha=0.3)
    if stats.layers:
        ax_m.legend()
    fig = ax_h.figure
    fig.tight_layout()
    return fig
