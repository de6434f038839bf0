"""Every matplotlib call of rnnscope lives here; this module is imported lazily by `.plot()`.

Each function takes result objects (never models), draws on the given axes or a new figure, and
returns the figure.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import matplotlib.pyplot as plt  # picks the non-interactive Agg backend when headless
    from matplotlib.ticker import LogFormatter, MaxNLocator
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("plotting needs matplotlib: pip install 'rnnscope[plot]'") from e


def plain(text) -> str:
    r"""A name from outside rnnscope (a model's module names, a results file, a log) as text
    matplotlib draws literally.

    Matplotlib parses a label holding two unescaped `$` as mathtext: a module named "a$b$"
    would be drawn in italics and one named "$\frac$" would raise while the figure is saved.
    Every `$` is escaped (mathtext's only special outside math mode), which matplotlib draws
    as a plain `$` both in plain labels and next to rnnscope's own math. Every user-supplied
    string that reaches a figure goes through here.

    Example:
        >>> plain("cost$ $x")
        'cost\\$ \\$x'
    """
    return str(text).replace("$", r"\$")


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


class _UnicodeLogFormatter(LogFormatter):
    """Log-axis tick labels 10⁻⁵ and 2×10⁻⁵ in plain Unicode.

    Matplotlib's default (`LogFormatterSciNotation`) writes every label as mathtext, and
    parsing it was half of the report's drawing time (2.2 of 5.4 s at T = 1000, each label
    parsed again for the PNG and the SVG). The labels read the same; which ticks are labelled
    (decades, and minor ticks on short spans) is matplotlib's own `LogFormatter` logic."""

    def set_locs(self, locs=None):
        """Matplotlib's choice of labelled minor ticks, except that a view it would leave
        with fewer than two labels (a span of ~0.4 decades around one decade tick) gets every
        minor tick labelled: one label cannot be read as a scale."""
        super().set_locs(locs)
        if self.labelOnlyBase or self._sublabels is None or locs is None or self.axis is None:
            return
        lo, hi = sorted(self.axis.get_view_interval())
        shown = [x for x in locs if lo <= x <= hi and x > 0]
        if sum(self(x) != "" for x in shown) + self._decades_in(lo, hi) < 2:
            self._sublabels = None

    def _decades_in(self, lo: float, hi: float) -> int:
        """Decade ticks in [lo, hi] (the major formatter labels them)."""
        if lo <= 0:
            return 0
        b = math.log(self._base)
        return max(0, math.floor(math.log(hi) / b + 1e-10) - math.ceil(math.log(lo) / b - 1e-10)
                   + 1)

    def __call__(self, x, pos=None):
        if x == 0:
            return "0"
        sign = "−" if x < 0 else ""
        x = abs(x)
        fx = math.log(x) / math.log(self._base)
        is_decade = abs(fx - round(fx)) < 1e-10
        exponent = round(fx) if is_decade else math.floor(fx)
        coeff = round(self._base ** (fx - exponent))
        if self.labelOnlyBase and not is_decade:
            return ""
        if self._sublabels is not None and coeff not in self._sublabels:
            return ""
        power = f"{self._base:g}{str(exponent).translate(_SUPERSCRIPT)}"
        return sign + (power if is_decade else f"{coeff}×{power}")


def _log_labels(base: float = 10.0, *, minor: bool = False) -> _UnicodeLogFormatter:
    """The major (decades only) or minor tick formatter of a log axis, as matplotlib's log
    scale sets them, writing Unicode instead of mathtext."""
    return _UnicodeLogFormatter(base, labelOnlyBase=not minor)


def _label_log_axis(axis) -> None:
    """`_log_labels` on a matplotlib Axis already on a log scale (ax.yaxis, a colorbar's)."""
    axis.set_major_formatter(_log_labels())
    axis.set_minor_formatter(_log_labels(minor=True))


def _log_y(ax) -> None:
    """The y axis on a log scale, labelled in Unicode (`_log_labels`)."""
    ax.set_yscale("log")
    _label_log_axis(ax.yaxis)


def _log_x(ax) -> None:
    """The x axis on a log scale, labelled in Unicode (`_log_labels`)."""
    ax.set_xscale("log")
    _label_log_axis(ax.xaxis)


def _plot_cdf(ax, values, **kwargs) -> None:
    """Empirical cumulative distribution of the finite values (nothing drawn if none)."""
    v = np.sort(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, **kwargs)


def _new_axes(ncols=1, width=6.0, height=4.2):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def _draw_profiles(ax, profiles: dict, log: bool) -> None:
    for name, p in profiles.items():
        y = p.by_distance().numpy()
        k = np.arange(len(y))
        (line,) = ax.plot(k, y, label=plain(name), lw=1.6)
        if p.per_sample.shape[0] > 1 and not log:
            sd = p.std_by_distance().numpy()
            ax.fill_between(k, np.maximum(y - sd, 0), y + sd, color=line.get_color(), alpha=0.15,
                            lw=0)
    if log:
        _log_y(ax)
        _mark_underflow(ax, profiles)
    ax.set_xlabel("distance from the output step k = T−1−t (steps)")
    ax.set_ylabel(r"mean $\|\partial L/\partial x_t\|$" + (" (log scale)" if log else ""))
    ax.grid(True, which="both" if log else "major", alpha=0.3)
    ax.legend()


def _mark_underflow(ax, profiles: dict) -> None:
    """A dotted line at the smallest normal number of the gradients' dtype when a profile
    goes below it (`GradientProfile.underflow`): there autograd's gradients keep only a few
    digits and soon read exactly 0 (the line's end on a log axis), which is what the optimizer
    receives, not a measurement failing."""
    reached = {u[:2] for u in (p.underflow() for p in profiles.values()) if u is not None}
    for dtype, tiny in sorted(reached):
        ax.axhline(tiny, ls=":", lw=1.0, color="0.4")
        ax.text(0.99, tiny, f"{dtype} underflow ({tiny:.0e}): below, digits are lost, then 0",
                transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7,
                color="0.3")


def plot_profiles(profiles: dict, ax=None, log: bool = False):
    """Mean input-gradient norm vs distance from the output (± 1 std band on linear axes)."""
    if ax is None:
        fig, (ax,) = _new_axes()
    fig = ax.figure
    _draw_profiles(ax, profiles, log)
    ax.set_title("Gradient reaching each timestep" + (" (log scale)" if log else ""))
    return fig


def plot_lag_profile(profiles: dict, ax=None, log: bool = True):
    """Mean ‖∂ℓ_t/∂x_{t−k}‖ against lag k, one line per LagProfile."""
    if ax is None:
        fig, (ax,) = _new_axes()
    fig = ax.figure
    for name, lp in profiles.items():
        y = lp.by_lag().numpy()
        ax.plot(np.arange(len(y)), y, label=plain(name), lw=1.6)
    if log:
        _log_y(ax)
    ax.set_xlabel("lag k = t − s (steps between input and loss step)")
    ax.set_ylabel("mean ‖∂ℓ_t/∂x_{t−k}‖")
    ax.set_title("How far back each step's loss reaches" + (" (log scale)" if log else ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_comparison(profiles: dict, log: bool | None = None, axes=None):
    """The classic LSTM gradient-flow analysis's comparison figure: linear and log panels side
    by side (log=None)."""
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


def plot_gate_stats(stats, axes=None, label: str = ""):
    """Left: retain-gate value histograms; right: per-unit memory time 1/(1−f̄) distributions.

    Several GateStats can share `axes` (pass a label for each)."""
    fresh = axes is None
    if fresh:
        fig, axes = _new_axes(2)
    ax_h, ax_m = axes
    gname = {"lstm": "forget gate f", "gru": "retain gate z"}.get(stats.kind, "decay |a|")
    if label:  # several kinds share the axes
        gname = "retain gate (LSTM f, GRU z; |a| of a decay recurrence)"
    for s in stats.layers:
        label_s = (f"{plain(label)} " if label else "") + f"layer {s.layer}" + (
            f" dir {s.direction}" if s.direction else "")
        centers = 0.5 * (s.edges[1:] + s.edges[:-1]).numpy()
        ax_h.step(centers, s.hist.numpy(), where="mid", label=label_s)
        _plot_cdf(ax_m, s.memory_time.numpy(), label=label_s)
    ax_h.set_xlabel(f"{gname} value")
    ax_h.set_ylabel("fraction of gate values")
    ax_h.set_title(f"{gname} distribution")
    if fresh or not any(pt.get_label() == "saturated (> 0.99)" for pt in ax_h.patches):
        ax_h.axvspan(0.99, 1.0, color="red", alpha=0.1, label="saturated (> 0.99)")
    ax_h.legend(fontsize="small")
    # log axis only when memory times span more than a factor 20 (all lines on these axes)
    xs = [ln.get_xdata() for ln in ax_m.lines if len(ln.get_xdata())]
    if xs and max(x.max() for x in xs) > 20 * max(min(x.min() for x in xs), 1e-12):
        _log_x(ax_m)
    ax_m.set_xlabel("memory time 1/(1 − mean gate) (steps" +
                    (", log scale)" if ax_m.get_xscale() == "log" else ")"))
    ax_m.set_ylabel("fraction of units ≤ x")
    ax_m.set_title("Per-unit memory time (cumulative)")
    ax_m.grid(True, which="both", alpha=0.3)
    if stats.layers:
        ax_m.legend(fontsize="small")
    fig = ax_h.figure
    fig.tight_layout()
    return fig


def plot_state_gradients(sg, ax=None, log: bool = True):
    """Mean ‖∂L/∂h_t‖ (solid) and ‖∂L/∂c_t‖ (dashed) per layer and direction vs timestep."""
    if ax is None:
        fig, (ax,) = _new_axes()
    for layer, dirs in enumerate(sg.layers):
        for d, g in enumerate(dirs):
            tag = f"layer {layer}" + (f" dir {d}" if len(dirs) > 1 else "")
            (line,) = ax.plot(g.h.mean(0).numpy(), label=f"{tag} ‖∂L/∂h_t‖")
            if g.c is not None:
                ax.plot(g.c.mean(0).numpy(), ls="--", color=line.get_color(),
                        label=f"{tag} ‖∂L/∂c_t‖")
    if log:
        _log_y(ax)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("mean total state-gradient norm" + (" (log scale)" if log else ""))
    ax.set_title(f"State gradients (loss = {plain(sg.loss)})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return ax.figure


def plot_cell_jacobians(cj, ax=None, share_ax=None, label: str = ""):
    """Plot a CellJacobians result; see `plot_jacobian_curves`."""
    if ax is None:
        fig, axes = _new_axes(2 if cj.direct is not None else 1)
        ax = axes[0]
        share_ax = axes[1] if len(axes) > 1 else None
    return plot_jacobian_curves(cj.by_distance(), cj.state, ax=ax, share_ax=share_ax,
                                label=label)


def plot_jacobian_curves(by: dict, state: str, ax, share_ax=None, label: str = "",
                         color=None, mean_unit: bool = True):
    """‖∂s_{T−1}/∂s_t‖₂ of the total (solid) vs the direct highway alone (dashed: largest unit;
    dotted: mean unit, if `mean_unit`), by distance, log scale; with `share_ax`, the direct
    path's energy share on a second axis. One colour per recurrence."""
    k = np.arange(len(by["spectral"]))
    sym = {"c": "c", "h": "h"}.get(state, "s")
    name = rf"$\partial {sym}_{{T-1}}/\partial {sym}_t$"
    pre = f"{plain(label)} " if label else ""
    _log_y(ax)
    (line,) = ax.plot(k, by["spectral"].numpy(), label=f"{pre}total ‖{name}‖₂", lw=1.8,
                      color=color)
    color = line.get_color()
    if "direct" in by:
        ax.plot(k, by["direct_spectral"].numpy(), ls="--", color=color,
                label=f"{pre}highway ∏ gate (largest unit)")
        if mean_unit:
            ax.plot(k, by["direct"].numpy(), ls=":", color=color,
                    label=f"{pre}highway, mean unit")
    ax.set_xlabel("distance k = T−1−t (steps)")
    ax.set_ylabel("Jacobian norm (log scale)")
    ax.set_title("State Jacobian across the span: highway vs total")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small" if len(ax.lines) > 6 else "small",
              ncol=2 if len(ax.lines) > 8 else 1)
    if share_ax is not None and "direct" in by:
        share_ax.plot(k, by["share"].numpy(), color=color, label=f"{pre}direct share")
        share_ax.set_ylim(-0.02, 1.02)
        share_ax.set_xlabel("distance k = T−1−t (steps)")
        share_ax.set_ylabel("‖D‖² / (‖D‖² + ‖J − D‖²)")
        share_ax.set_title("Share of the Jacobian carried by the highway")
        share_ax.grid(True, alpha=0.3)
        share_ax.legend(fontsize="small")
    ax.figure.tight_layout()
    return ax.figure


def plot_step_paths(direct_mean, indirect_norm, ax=None, label: str = ""):
    """Per-step direct (mean forget gate) vs indirect (‖K_t E_{t−1}‖₂) one-step terms."""
    if ax is None:
        fig, (ax,) = _new_axes()
    t = np.arange(len(direct_mean))
    pre = f"{plain(label)} " if label else ""
    ax.plot(t, np.asarray(direct_mean), label=pre + r"direct: mean $f_t$ (the diagonal)")
    ax.plot(t, np.asarray(indirect_norm),
            label=pre + r"indirect: $\|\partial c_t/\partial c_{t-1} - \mathrm{diag}(f_t)\|_2$")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("one-step term")
    ax.set_title("One step of the cell-state path: direct vs indirect")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return ax.figure


def plot_decay_curves(forget_values, max_length: int, ax=None):
    """f^k vs k for constant forget gates (log scale): the classic LSTM gradient-flow analysis's
    decay table as curves."""
    if ax is None:
        fig, (ax,) = _new_axes()
    k = np.arange(max_length + 1)
    _log_y(ax)
    for f in forget_values:
        ax.plot(k, np.power(float(f), k), label=f"f = {f}  (memory time {1 / (1 - f):.0f})"
                if f < 1 else f"f = {f}")
    ax.set_xlabel("steps L")
    ax.set_ylabel("gradient factor f^L (log scale)")
    ax.set_title("Direct-path decay for a constant forget gate")
    ax.set_ylim(bottom=1e-30)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return ax.figure


def lag_heatmap_rows(records: list, layer: str) -> tuple[str, list]:
    """What a layer's heatmap draws, from monitor `Record`s (or their JSON dicts):
    ("output", [(step, row by lag)]) from the rows of the gradient arriving at output step t by
    lag k = t − s (a per-step loss, exact steps), or else ("input", [(step, row by lag)]) from
    the per-timestep input profile read by lag k = T−1−t (a loss at the last step);
    ("input", []) when neither is there."""
    from .monitor.record import Record

    recs = [r if isinstance(r, Record) else Record.from_dict(r) for r in records]
    lays = [(r.step, r.layers[layer]) for r in recs if layer in r.layers]
    out = [(step, list(lay.output_lag_grad.by_lag)) for step, lay in lays
           if lay.output_lag_grad is not None and lay.output_lag_grad.by_lag]
    if out:
        return "output", out
    return "input", [(step, list(lay.input_grad.mean)[::-1]) for step, lay in lays
                     if lay.input_grad is not None and lay.input_grad.mean]


def plot_lag_heatmap(records: list, layer: str, ax=None):
    """A layer's gradient by lag (rows) and training step (columns), log colour scale; None if
    no record has a row for that layer.

    Under a per-step loss the rows are the mean ‖∂(g_t·y_t)/∂x_{t−k}‖ of the gradient arriving
    at output step t (the monitor's exact steps); otherwise the mean ‖∂L/∂x_t‖ by k = T−1−t.
    """
    from matplotlib.colors import LogNorm

    which, rows = lag_heatmap_rows(records, layer)
    if not rows:
        return None
    T = max(len(p) for _, p in rows)
    grid = np.full((T, len(rows)), np.nan)
    for j, (_, vals) in enumerate(rows):
        grid[: len(vals), j] = vals
    pos = grid[np.isfinite(grid) & (grid > 0)]
    if ax is None:
        fig, (ax,) = _new_axes(1, width=8.0)
    steps = [s for s, _ in rows]
    norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size else None
    masked = np.ma.masked_where(~(np.isfinite(grid) & (grid > 0)), grid)
    if all(b - a == 1 for a, b in zip(steps, steps[1:])):  # one column per step
        im = ax.imshow(masked, aspect="auto", origin="lower", norm=norm, cmap="viridis",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, T - 0.5),
                       interpolation="nearest")
    else:  # steps logged at uneven intervals: each column spans halfway to its neighbours
        x = np.asarray(steps, dtype=float)
        mid = (x[1:] + x[:-1]) / 2
        edges = np.concatenate([[x[0] - (mid[0] - x[0] if len(x) > 1 else 0.5)], mid,
                                [x[-1] + (x[-1] - mid[-1] if len(x) > 1 else 0.5)]])
        im = ax.pcolormesh(edges, np.arange(T + 1) - 0.5, masked, norm=norm, cmap="viridis")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # training steps are whole
    ax.set_xlabel("training step")
    if which == "output":
        cb = ax.figure.colorbar(im, ax=ax, label=r"mean $\|\partial(g_t \cdot y_t)/\partial "
                                                 r"x_{t-k}\|$ (log scale)")
        ax.set_ylabel("lag k = t − s (steps before output step t)")
        ax.set_title(f"{plain(layer)}: gradient arriving at output step t, by lag")
    else:
        cb = ax.figure.colorbar(im, ax=ax,
                                label=r"mean $\|\partial L/\partial x_t\|$ (log scale)")
        ax.set_ylabel("lag k = T−1−t (steps before the last timestep)")
        ax.set_title(f"{plain(layer)}: gradient reaching each lag over training")
    if norm is not None:
        _label_log_axis(cb.ax.yaxis)
    return ax.figure


def plot_alert_timeline(alerts: list, steps: list, ax=None):
    """One row per alert kind, a mark at each step an alert fired."""
    if ax is None:
        fig, (ax,) = _new_axes(1, width=8.0, height=2.6)
    kinds = sorted({a["kind"] for a in alerts})
    for i, kind in enumerate(kinds):
        xs = [a["step"] for a in alerts if a["kind"] == kind]
        ax.scatter(xs, [i] * len(xs), marker="|", s=200, label=plain(kind))
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels([plain(k) for k in kinds])
    if steps:
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_title("Alerts" if kinds else "Alerts (none fired)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.figure.tight_layout()
    return ax.figure


def plot_learning_curves(curves: dict, baseline: float, ax=None, train: dict | None = None):
    """Evaluation loss / baseline vs training step per variant (log y); 1 = memoryless."""
    if ax is None:
        fig, (ax,) = _new_axes(1, width=7.5)
    for name, pts in curves.items():
        steps = [p[0] for p in pts]
        vals = [float(p[1]) / baseline for p in pts]
        (line,) = ax.plot(steps, vals, marker="o", ms=3, label=plain(name))
        if train and name in train:
            tr = np.array([float(v) for v in train[name]]) / baseline
            w = max(len(tr) // 100, 1)
            smooth = np.convolve(tr, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w, len(tr) + 1), smooth, color=line.get_color(), alpha=0.25, lw=1)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="memoryless baseline")
    ax.axhline(0.5, color="gray", ls=":", lw=1, label="50% of baseline")
    _log_y(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss / baseline (log scale)")
    ax.set_title("Learning curves (markers: held-out loss; faint: training loss)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return ax.figure


def plot_heatmap_grid(heatmaps: dict, steps: dict):
    """Per-variant lag × training-step heatmaps of mean ‖∂L/∂x_t‖, one shared log colour scale."""
    from matplotlib.colors import LogNorm

    names = [n for n, h in heatmaps.items() if h and any(r for r in h)]
    if not names:
        return None
    grids = {}
    for n in names:
        rows = [r for r in heatmaps[n] if r]
        T = max(len(r) for r in rows)
        g = np.full((T, len(rows)), np.nan)
        for j, r in enumerate(rows):
            vals = np.array([float(v) for v in r])[::-1]
            g[: len(vals), j] = vals
        grids[n] = g
    allv = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids.values()])
    norm = LogNorm(vmin=max(allv.min(), allv.max() * 1e-12), vmax=allv.max())
    fig, axes = plt.subplots(1, len(names), figsize=(2.9 * len(names) + 1.2, 3.6),
                             squeeze=False, layout="constrained")
    for ax, n in zip(axes[0], names):
        g = grids[n]
        s = steps[n]
        im = ax.imshow(np.ma.masked_where(~(np.isfinite(g) & (g > 0)), g), aspect="auto",
                       origin="lower", norm=norm, cmap="viridis", interpolation="nearest",
                       extent=(s[0] - 0.5, s[-1] + 0.5, -0.5, g.shape[0] - 0.5))
        ax.set_title(plain(n))
        ax.set_xlabel("training step")
    axes[0][0].set_ylabel("lag k (steps before the last input)")
    cb = fig.colorbar(im, ax=list(axes[0]), label=r"mean $\|\partial L/\partial x_t\|$ (log)")
    _label_log_axis(cb.ax.yaxis)
    fig.suptitle("Gradient reaching each lag over training")
    return fig


def plot_memory_time_shift(before: dict, after: dict, colors: dict | None = None):
    """Per-unit memory time 1/(1 − mean gate), cumulative: at initialisation (dashed) and after
    training (solid), per gated variant (`colors`: name -> colour, to match other figures)."""
    fig, (ax,) = _new_axes(1, width=7.5)
    for i, name in enumerate(before):
        color = (colors or {}).get(name, f"C{i}")
        for stats, ls, when in ((before[name], "--", "init"), (after[name], "-", "end")):
            _plot_cdf(ax, np.concatenate([s.memory_time.numpy() for s in stats.layers]), ls=ls,
                      color=color, label=f"{plain(name)} ({when})")
    _log_x(ax)
    ax.set_xlabel("memory time 1/(1 − mean gate) (steps, log scale)")
    ax.set_ylabel("fraction of units ≤ x")
    ax.set_title("Forget/retain-gate memory times: before (dashed) and after (solid) training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_curse_of_memory(com, ax=None):
    """E(∂h_t/∂λ)² against the memory time 1/(1 − λ) (`CurseOfMemory`): the closed form as
    lines, the measured Monte-Carlo means as markers with ±2 standard errors, one colour per
    input scaling."""
    if ax is None:
        fig, (ax,) = _new_axes(1, width=6.5)
    fig = ax.figure
    memory = 1.0 / (1.0 - com.lam.numpy())
    names = {"none": "plain input (γ = 1)", "gamma_fixed": "γ = √(1−λ²), held fixed",
             "gamma_tied": "γ(λ) = √(1−λ²), differentiated"}
    for i, scale in enumerate(com.closed):
        color = f"C{i}"
        ax.plot(memory, com.closed[scale].numpy(), color=color,
                label=f"{names.get(scale, scale)}: closed form")
        m, se = com.measured[scale].numpy(), com.stderr[scale].numpy()
        ax.errorbar(memory, m, yerr=2 * se, fmt="o", ms=4, color=color, capsize=2,
                    label=f"measured ({com.samples} sequences)")
    _log_x(ax)
    _log_y(ax)
    ax.set_xlabel("memory time 1/(1 − λ) (steps)")
    ax.set_ylabel(r"$E\,(\partial h_t/\partial\lambda)^2$" + f" at t = {com.t}")
    ax.set_title("Curse of memory: parameter sensitivity of h_t = λh_{t−1} + γx_t")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
