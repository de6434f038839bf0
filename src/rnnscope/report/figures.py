"""Figures drawn from a study result alone (never from models), so a saved results.json
re-plots identically. Every function takes a `StudyResult` (or, for the experiment figures, an
`ExperimentResult`) and returns {figure name: matplotlib Figure}."""

from __future__ import annotations

from .. import plotting


def gradient_flow(results) -> dict:
    return {"gradient_flow": results.comparison.plot()}


def lag(results) -> dict:
    lags = results.lag_profiles()
    if not lags:
        return {}
    fig, (ax,) = plotting._new_axes(1, width=7.5)
    plotting.plot_lag_profile(lags, ax=ax, log=True)
    fig.tight_layout()
    return {"lag": fig}


def _labelled(results) -> dict:
    """The analysed modules by legend label: compare's names are the kinds ("LSTM"); inspect's
    are submodule paths, so the kind is added ("rnn (LSTM)") unless the name says it."""
    rec = results.analysed()
    if results.command != "inspect":
        return rec
    out = {}
    for name, r in rec.items():
        kind = r.kind.upper() if r.kind in ("lstm", "gru", "rnn") else r.kind
        out[name if kind.lower() in name.lower() else f"{name} ({kind})"] = r
    return out


def highway(results) -> dict:
    rec = _labelled(results)
    if not rec:
        return {}
    fig, axes = plotting._new_axes(2, height=4.8)
    n_curves = sum(len(r.layers) for r in rec.values())
    i = 0
    for name, r in rec.items():
        for lay in r.layers:
            tag = name if len(r.layers) == 1 else f"{name} l{lay.layer}d{lay.direction}"
            cj = lay.cell_jacobians
            plotting.plot_jacobian_curves(cj.by_distance(), cj.state, ax=axes[0],
                                          share_ax=axes[1], label=tag, color=f"C{i % 10}",
                                          mean_unit=n_curves <= 3)
            i += 1
    # two lines: on one, the title ran past the figure's left edge
    axes[0].set_title(r"$\partial s_{T-1}/\partial s_t$: highway vs total" "\n"
                      "(s: the state each Jacobian follows; c for the LSTM)")
    if not axes[1].lines:
        axes[1].set_visible(False)
    fig.tight_layout()
    return {"highway": fig}


def step_paths(results) -> dict:
    rec = {k: r for k, r in _labelled(results).items() if r.kind == "lstm"}
    if not rec:
        return {}
    fig, (ax,) = plotting._new_axes(1, width=7.5)
    for name, r in rec.items():
        sp = r.layers[0].step_paths
        plotting.plot_step_paths(sp.direct_mean.numpy(), sp.indirect_spectral.numpy(), ax=ax,
                                 label=name)
    fig.tight_layout()
    return {"step_paths": fig}


def gates(results) -> dict:
    rec = {k: r for k, r in _labelled(results).items() if r.gates is not None}
    if not rec:
        return {}
    fig, axes = plotting._new_axes(2)
    for name, r in rec.items():
        r.gates.plot(axes=axes, label=name)
    return {"gates": fig}


def decay(results) -> dict:
    rows = results.decay_table.rows
    forgets = sorted({r["forget"] for r in rows})
    longest = max(r["length"] for r in rows)
    return {"decay": plotting.plot_decay_curves(forgets, longest)}


ALL = (gradient_flow, lag, highway, step_paths, gates, decay)
# every figure name ALL may return: the report's targets, checked before any work
NAMES = ("gradient_flow", "lag", "highway", "step_paths", "gates", "decay")


# ---- experiment ------------------------------------------------------------------------------


def learning_curves(results) -> dict:
    v = results.variants
    fig = plotting.plot_learning_curves({n: d.eval_loss.tolist() for n, d in v.items()},
                                        results.baseline,
                                        train={n: d.train_loss.tolist() for n, d in v.items()})
    return {"learning_curves": fig}


def profiles_before_after(results) -> dict:
    fig, axes = plotting._new_axes(2)
    for ax, when in zip(axes, ("init", "end")):
        profs = {n: getattr(d, f"profile_{when}") for n, d in results.variants.items()}
        plotting.plot_profiles(profs, ax=ax, log=True)
        ax.set_title(("At initialisation" if when == "init" else "After training") +
                     ": gradient of the task loss reaching each step")
    fig.tight_layout()
    return {"profiles": fig}


def heatmaps(results) -> dict:
    v = results.variants
    fig = plotting.plot_heatmap_grid(
        {n: [None if r is None else r.tolist() for r in d.heatmap] for n, d in v.items()},
        {n: d.monitor_steps.tolist() for n, d in v.items()})
    return {"heatmaps": fig} if fig is not None else {}


def memory_times(results) -> dict:
    v = {n: d for n, d in results.variants.items()
         if d.gates_init is not None and d.gates_end is not None}
    if not v:
        return {}
    order = list(results.variants)  # the colours the other figures give each variant
    fig = plotting.plot_memory_time_shift(
        {n: d.gates_init for n, d in v.items()},
        {n: d.gates_end for n, d in v.items()},
        colors={n: f"C{order.index(n)}" for n in v})
    return {"memory_times": fig}


EXPERIMENT = (learning_curves, profiles_before_after, heatmaps, memory_times)
EXPERIMENT_NAMES = ("learning_curves", "profiles", "heatmaps", "memory_times")
