"""Write a report folder: report.html, figures/*.png and *.svg, results.json.

Everything is drawn in memory first and written only when all of it succeeded, each file
atomically and inside the folder (see safe_write). The files a report may hold are known before
any work (`report_targets`), so the overwrite check covers all of them up front.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from . import figures as figure_makers
from .draw import draw_all, png_bytes, svg_bytes
from .safe_write import OutputFolder

from ..codec import SchemaError, dumps, loads
from ..study_results import ExperimentResult, StudyResult, study_from_dict


class ResultsError(ValueError):
    """A results.json that rnnscope cannot read (one line naming the file and the field)."""


def report_targets(command: str) -> list[str]:
    """Every file a report for `command` may write, relative to the folder."""
    names = (figure_makers.EXPERIMENT_NAMES if command == "experiment"
             else figure_makers.NAMES)
    return (["results.json", "report.html"]
            + [f"figures/{n}.{ext}" for n in names for ext in ("png", "svg")])


def _makers(results):
    return figure_makers.EXPERIMENT if results.command == "experiment" else figure_makers.ALL


def figures_from_results(results: StudyResult | ExperimentResult) -> dict:
    """{name: Figure} for every figure the results support, drawn from the results alone."""
    out = {}
    for make in _makers(results):
        out.update(make(results))
    return out


def load_results(path) -> StudyResult | ExperimentResult:
    """Read a results.json written by `write_report` (plain JSON, nothing executed) into its
    result object, validated field by field against the schema (`codec.SCHEMA`).

    A file without a schema number was written by an rnnscope before the schema existed; it
    is refused with a message saying to rerun the command (its layout differs in places that
    cannot be read back exactly).

    Raises:
        ResultsError: the file is not UTF-8 JSON, has another schema, or a field is missing,
            of the wrong type or shape (the first one is named).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = loads(fh.read())
    except FileNotFoundError:
        raise ResultsError(f"{path} does not exist (expected the results.json that rnnscope "
                           "compare, inspect or experiment wrote)") from None
    except IsADirectoryError:
        raise ResultsError(f"{path} is a folder; give the results.json inside it") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not a results.json: it is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path} is not a results.json: invalid JSON at line {e.lineno} "
                           f"column {e.colno} ({e.msg})") from None
    except SchemaError as e:  # a bare NaN/Infinity literal
        raise ResultsError(f"{path} is not a results.json rnnscope wrote: {e}") from None
    if not isinstance(data, dict) or not ("comparison" in data or "variants" in data
                                          or "schema" in data):
        raise ResultsError(f"{path} is not an rnnscope results.json (expected a JSON object "
                           f"with 'schema', 'command' and the results)")
    try:
        return study_from_dict(data, "results")
    except SchemaError as e:
        raise ResultsError(f"{path}: {' '.join(str(e).split())}") from None


def check_writable(out_dir, *, overwrite: bool, command: str = "compare") -> None:
    """Refuse, before any work, if a file the report may write exists and not `overwrite`.

    Covers results.json, report.html and every figure the command can draw, also when
    report.html is absent; refuses symlinked subfolders always (see safe_write).
    """
    OutputFolder(out_dir, overwrite=overwrite).check(report_targets(command))


def render_report(results: StudyResult | ExperimentResult, *,
                  source: str | None = None, helper: bool | None = None) -> dict[str, bytes]:
    """Every file of the report as bytes, by relative path, drawn in memory (nothing written).

    Args:
        results: the study's result object.
        source: where the dict was read from (a results.json); errors while drawing it become
            ResultsError naming it, since a wrong file, not rnnscope, is then the likely cause.
        helper: share the figures with a forked helper process (`draw.draw_all`); None: where
            available (Linux, two or more CPUs, RNNSCOPE_DRAW_HELPER not 0).
    """
    import matplotlib.pyplot as plt

    from .html import render_experiment_html, render_html

    command = results.command
    makers = _makers(results)
    allowed = set(figure_makers.EXPERIMENT_NAMES if command == "experiment"
                  else figure_makers.NAMES)
    render = render_experiment_html if command == "experiment" else render_html
    files = {}

    def numbers() -> None:  # run while a helper process (if any) already draws
        try:
            files["results.json"] = dumps(results.to_dict()).encode("utf-8")
            # the page's readings use most of the numbers and take milliseconds: a dry run
            # with every figure present finds a broken file before seconds of drawing
            render(results, dict.fromkeys(allowed, ""))
        except Exception as e:  # noqa: BLE001
            _results_error(e, source, "reading the numbers")
            raise

    def draw_one(make, results) -> dict:
        try:
            figs = make(results)
        except Exception as e:  # noqa: BLE001 - see below
            _results_error(e, source, f"drawing the {make.__name__!r} figure")
            raise
        drawn = {}
        try:
            for name, fig in figs.items():
                if name not in allowed:  # the overwrite check must have covered every target
                    raise RuntimeError(f"figure {name!r} is not in report_targets: add it to "
                                       f"figures.NAMES")
                try:
                    drawn[name] = (png_bytes(fig), svg_bytes(fig))
                except Exception as e:  # noqa: BLE001
                    _results_error(e, source, f"drawing the {name!r} figure")
                    raise
        finally:
            for fig in figs.values():
                plt.close(fig)
        return drawn

    embedded = {}
    for drawn in draw_all(makers, results, draw_one, helper=helper, first=numbers):
        for name, (png, svg) in drawn.items():
            files[f"figures/{name}.png"] = png
            files[f"figures/{name}.svg"] = svg
            embedded[name] = base64.b64encode(png).decode("ascii")
    try:
        files["report.html"] = render(results, embedded).encode("utf-8")
    except Exception as e:  # noqa: BLE001
        _results_error(e, source, "writing report.html")
        raise
    return files


def _results_error(e: Exception, source: str | None, doing: str) -> None:
    """Raise a one-line ResultsError for a results dict read from a file; else return."""
    if source is None or isinstance(e, ResultsError):
        return
    if isinstance(e, KeyError):
        what = f"missing key {e.args[0]!r}" if e.args else "a missing key"
    elif isinstance(e, IndexError):
        what = "a list shorter than the others it goes with"
    else:
        text = " ".join(str(e).split())[:160]
        what = f"{type(e).__name__}: {text}" if text else type(e).__name__
    raise ResultsError(f"{source} is not a results.json rnnscope can draw ({doing}: {what})") \
        from e


def write_report(results: StudyResult | ExperimentResult, out_dir, *, overwrite: bool = False,
                 source: str | None = None) -> dict:
    """Write results.json, figures and report.html into out_dir; return {kind: path}.

    Refuses to replace any file the report may write (results.json, report.html, figures/*)
    unless `overwrite`. Everything is drawn in memory first; files are then written atomically
    (figures, results.json, report.html last). With `overwrite`, figures of an earlier report
    that this one does not draw are removed, so the folder holds one run.

    If drawing fails for freshly computed results (`source` None), results.json alone is
    written so the numbers are kept, and the error says how to redraw them; for results read
    from `source`, nothing is written and a ResultsError names the file.
    """
    folder = OutputFolder(out_dir, overwrite=overwrite)
    targets = report_targets(results.command)
    folder.check(targets)
    try:
        files = render_report(results, source=source)
    except ResultsError:
        raise
    except Exception as e:
        if source is not None:
            raise
        try:
            text = dumps(results.to_dict())
        except ValueError:
            raise e from None
        saved = folder.write_text("results.json", text)
        raise RuntimeError(f"drawing the report failed ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]}); the numbers are saved in "
                           f"{saved}: 'rnnscope replot {saved} --out {folder.root} --overwrite' "
                           f"redraws them") from e
    paths = {}
    order = sorted(files, key=lambda rel: (rel == "report.html", rel == "results.json", rel))
    for rel in order:
        paths[rel] = str(folder.write_bytes(rel, files[rel]))
    if overwrite:
        for rel in targets:
            if rel not in files and rel.startswith("figures/"):
                folder.remove(rel)
    out = {"results": paths["results.json"], "html": paths["report.html"]}
    out.update({Path(rel).stem: p for rel, p in paths.items() if rel.endswith(".png")})
    return out


def png_of(fig) -> bytes:
    """The exact PNG bytes the report writes for a figure (for re-plot checks)."""
    return png_bytes(fig)
