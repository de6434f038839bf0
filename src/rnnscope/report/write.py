"""Write a report folder: report.html, figures/*.png and *.svg, results.json."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from . import figures as figure_makers


def figures_from_results(results: dict) -> dict:
    """{name: Figure} for every figure the results support, drawn from the dict alone."""
    makers = figure_makers.EXPERIMENT if results.get("command") == "experiment" else \
        figure_makers.ALL
    out = {}
    for make in makers:
        out.update(make(results))
    return out


def load_results(path) -> dict:
    """Read a results.json written by `write_report` (plain JSON, nothing executed)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not ("comparison" in data or "variants" in data):
        raise ValueError(f"{path} is not an rnnscope results.json")
    return data


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def check_writable(out_dir, *, overwrite: bool) -> None:
    """Raise FileExistsError if out_dir already holds a report and overwrite is False."""
    out = Path(out_dir)
    existing = [str(p) for p in (out / "report.html", out / "results.json") if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{' and '.join(existing)} already exist; pass --overwrite (or "
                              "choose another --out) to replace them")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")


def write_report(results: dict, out_dir, *, overwrite: bool = False) -> dict:
    """Write results.json, figures and report.html into out_dir; return {kind: path}.

    Refuses to overwrite an existing report.html or results.json unless `overwrite`.
    """
    import matplotlib.pyplot as plt

    from .html import render_experiment_html, render_html

    out = Path(out_dir)
    check_writable(out, overwrite=overwrite)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, allow_nan=False)
    (out / "results.json").write_text(text, encoding="utf-8")
    figs = figures_from_results(results)
    embedded = {}
    paths = {"results": str(out / "results.json")}
    for name, fig in figs.items():
        png = _png_bytes(fig)
        (out / "figures" / f"{name}.png").write_bytes(png)
        fig.savefig(out / "figures" / f"{name}.svg", format="svg", metadata={"Date": None})
        embedded[name] = base64.b64encode(png).decode("ascii")
        paths[name] = str(out / "figures" / f"{name}.png")
        plt.close(fig)
    render = render_experiment_html if results.get("command") == "experiment" else render_html
    (out / "report.html").write_text(render(results, embedded), encoding="utf-8")
    paths["html"] = str(out / "report.html")
    return paths


def png_of(fig) -> bytes:
    """The exact PNG bytes the report writes for a figure (for re-plot checks)."""
    return _png_bytes(fig)
