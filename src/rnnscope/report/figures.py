"""Figures drawn from a results dict alone (never from models), so saved results re-plot
identically. Every function returns {figure name: matplotlib Figure}."""

from __future__ import annotations

from .. import plotting
from ..results import CellJacobians, Comparison, GateStats, from_json_list


def _first_layer(rec: dict) -> dict:
    return rec["layers"][0]


def gradient_flow(results: dict) -> dict:
    cmp = Comparison.from_dict(results["comparison"])
    fig = cmp.plot()
    return {"gradient_flow": fig}


def lag(results: dict) -> dict:
    from ..results import LagProfile

    lags = {n: LagProfile.from_dict(d) for n, d in results.get("lag", {}).items()
            if "skipped" not in d}
    if not lags:
        return {}
    fig, (ax,) = plotting._new_axes(1, width=7.5)
    plotting.plot_lag_profile(lags, ax=ax, log=True)
    fig.tight_layout()
    return {"lag": fig}


def highway(results: dict) -> dict:
    rec = {k: v for k, v in results["recurrent"].items() if "layers" in v}
    if not rec:
        return {}
    fig, axes = plotting._new_axes(2, height=4.8)
    n_curves = sum(len(r["layers"]) for r in rec.values())
    i = 0
    for name, r in rec.items():
        for lay in r["layers"]:
            tag = name if len(r["layers"]) == 1 else f"{name} l{lay['layer']}d{lay['direction']}"
            curves = CellJacobians.curves_from_dict(lay["cell_jacobians"])
            plotting.plot_jacobian_curves(curves, lay["cell_jacobians"]["state"], ax=axes[0],
                                          share_ax=axes[1], label=tag, color=f"C{i % 10}",
                                          mean_unit=n_curves <= 3)
            i += 1
    axes[0].set_title(r"$\partial s_{T-1}/\partial s_t$: highway vs total "
                      "(LSTM s = c; GRU, RNN s = h)")
    if not axes[1].lines:
        axes[1].set_visible(False)
    fig.tight_layout()
    return {"highway": fig}


def step_paths(results: dict) -> dict:
    rec = {k: v for k, v in results["recurrent"].items()
           if "layers" in v and v["kind"] == "lstm"}
    if not rec:
        return {}
    fig, (ax,) = plotting._new_axes(1, width=7.5)
    for name, r in rec.items():
        lay = _first_layer(r)
        sp = lay["step_paths"]
        plotting.plot_step_paths(from_json_list(sp["direct_mean"]).numpy(),
                                 from_json_list(sp["indirect_spectral"]).numpy(), ax=ax,
                                 label=name)
    fig.tight_layout()
    return {"step_paths": fig}


def gates(results: dict) -> dict:
    rec = {k: v for k, v in results["recurrent"].items() if "gates" in v}
    if not rec:
        return {}
    fig, axes = plotting._new_axes(2)
    for name, r in rec.items():
        GateStats.from_dict(r["gates"]).plot(axes=axes, label=name)
    return {"gates": fig}


def decay(results: dict) -> dict:
    rows = results["decay_table"]["rows"]
    forgets = sorted({r["forget"] for r in rows})
    longest = max(r["length"] for r in rows)
    return {"decay": plotting.plot_decay_curves(forgets, longest)}


ALL = (gradient_flow, lag, highway, step_paths, gates, decay)
# every figure name ALL may return: the report's targets, checked before any work
NAMES = ("gradient_flow", "lag", "highway", "step_paths", "gates", "decay")


# ---- experiment ------------------------------------------------------------------------------


def learning_curves(results: dict) -> dict:
    v = results["variants"]
    fig = plotting.plot_learning_curves({n: d["eval_loss"] for n, d in v.items()},
                                        results["baseline"],
                                        train={n: d["train_loss"] for n, d in v.items()})
    return {"learning_curves": fig}


def profiles_before_after(results: dict) -> dict:
    from ..results import GradientProfile

    fig, axes = plotting._new_axes(2)
    for ax, when in zip(axes, ("init", "end")):
        profs = {n: GradientProfile.from_dict(d[f"profile_{when}"])
                 for n, d in results["variants"].items()}
        plotting.plot_profiles(profs, ax=ax, log=True)
        ax.set_title(("At initialisation" if when == "init" else "After training") +
                     ": gradient of the task loss reaching each step")
    fig.tight_layout()
    return {"profiles": fig}


def heatmaps(results: dict) -> dict:
    v = results["variants"]
    fig = plotting.plot_heatmap_grid({n: d["heatmap"] for n, d in v.items()},
                                     {n: d["monitor_steps"] for n, d in v.items()})
    return {"heatmaps": fig} if fig is not None else {}


def memory_times(results: dict) -> dict:
    v = {n: d for n, d in results["variants"].items() if d.get("gates_init")}
    if not v:
        return {}
    order = list(results["variants"])  # the colours the other figures give each variant
    fig = plotting.plot_memory_time_shift(
        {n: GateStats.from_dict(d["gates_init"]) for n, d in v.items()},
        {n: GateStats.from_dict(d["gates_end"]) for n, d in v.items()},
        colors={n: f"C{order.index(n)}" for n in v})
    return {"memory_times": fig}


EXPERIMENT = (learning_curves, profiles_before_after, heatmaps, memory_times)
EXPERIMENT_NAMES = ("learning_curves", "profiles", "heatmaps", "memory_times")
