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


def highway(results: dict) -> dict:
    rec = {k: v for k, v in results["recurrent"].items() if "layers" in v}
    if not rec:
        return {}
    fig, axes = plotting._new_axes(2)
    for name, r in rec.items():
        for lay in r["layers"]:
            tag = name if len(r["layers"]) == 1 else f"{name} l{lay['layer']}d{lay['direction']}"
            curves = CellJacobians.curves_from_dict(lay["cell_jacobians"])
            plotting.plot_jacobian_curves(curves, lay["cell_jacobians"]["state"], ax=axes[0],
                                          share_ax=axes[1], label=tag)
    axes[0].set_title(r"$\partial s_{T-1}/\partial s_t$: highway vs total (LSTM s = c; GRU, RNN s = h)")
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


ALL = (gradient_flow, highway, step_paths, gates, decay)
