"""Contained, atomic writes: every file rnnscope writes stays inside --out, goes through a
temporary name, and is refused up front when it would replace something without --overwrite;
crafted results.json and monitor logs give one-line errors; names are safe for mathtext and
HTML."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from rnnscope import cli
from rnnscope.report import load_results, write_report
from rnnscope.report.figures import EXPERIMENT_NAMES, NAMES
from rnnscope.report.html import render_experiment_html, render_html
from rnnscope.report.safe_write import OutputFolder, OutputFolderError
from rnnscope.report.write import ResultsError, check_writable, report_targets
from rnnscope.codec import SCHEMA, SchemaError
from rnnscope.studies import compare_study, inspect_study
from rnnscope.study_results import experiment_result, study_from_dict

SCRIPT = "<script>alert(1)</script>"


def listing(root: Path) -> dict:
    """Every entry under root (links not followed): relative path -> kind and content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


@pytest.fixture(scope="module")
def compare_results():
    return compare_study(models=("rnn", "lstm"), seq_len=6, hidden_size=4, input_size=3,
                         samples=3, num_layers=1, seed=0, jac_samples=2)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.fixture(scope="module")
def inspect_results():
    torch.manual_seed(0)
    return inspect_study(Tagger(), loss="all", seq_len=6, samples=3, seed=0, jac_samples=2,
                         label="Tagger", source="test")


@pytest.fixture(scope="module")
def experiment_results():
    from rnnscope.experiments import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(task="adding", T=6, steps=3, batch_size=2, hidden_size=3,
                           variants=("lstm",), seed=0, device="cpu")
    return experiment_result(run_experiment(cfg))


# ---- the output folder ---------------------------------------------------------------------


def test_every_target_is_checked_even_without_report_html(tmp_path):
    for command, names in (("compare", NAMES), ("experiment", EXPERIMENT_NAMES)):
        targets = report_targets(command)
        assert {"results.json", "report.html"} <= set(targets)
        assert {f"figures/{n}.{e}" for n in names for e in ("png", "svg")} <= set(targets)
    out = tmp_path / "rep"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "gates.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"gates\.png already exists; pass --overwrite"):
        check_writable(out, overwrite=False, command="compare")
    check_writable(out, overwrite=True, command="compare")
    # an experiment draws other figures: gates.png is not in its way
    check_writable(out, overwrite=False, command="experiment")


def test_all_existing_targets_are_counted(tmp_path):
    out = tmp_path / "rep"
    (out / "figures").mkdir(parents=True)
    for n in NAMES:
        (out / "figures" / f"{n}.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"and 2 more already exist; pass --overwrite"):
        check_writable(out, overwrite=False)


def test_cli_refuses_before_any_work_when_only_a_figure_exists(tmp_path, capsys):
    out = tmp_path / "rep"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "highway.png").write_bytes(b"mine")
    before = listing(tmp_path)
    code = cli.main(["compare", "--models", "lstm", "--seq-len", "5", "--hidden-size", "3",
                     "--input-size", "2", "--samples", "2", "--out", str(out)])
    err = capsys.readouterr()
    assert code == 1
    assert "highway.png already exists; pass --overwrite" in err.err
    assert len(err.err.strip().splitlines()) == 1
    assert "configuration:" not in err.out  # refused before the run was even configured
    assert listing(tmp_path) == before


def test_symlinks_are_never_followed_out_of_the_folder(tmp_path, compare_results):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    out = tmp_path / "rep"
    out.mkdir()
    os.symlink(outside / "victim.txt", out / "results.json")  # points outside
    os.symlink(outside / "new.json", out / "report.html")  # dangling
    results = copy.deepcopy(compare_results)
    before = listing(outside)
    with pytest.raises(FileExistsError, match=r"2 of them symlinks: --overwrite replaces the "
                                              r"link itself, never the file it points to"):
        write_report(results, out)
    assert listing(outside) == before
    # with --overwrite the links themselves are replaced by regular files inside the folder
    # (a `$` pair in a module name draws too: it is escaped for mathtext)
    results = study_from_dict(json.loads(json.dumps(results.to_dict())
                                         .replace('"LSTM"', '"cost$\\\\frac$"')))
    paths = write_report(results, out, overwrite=True)
    assert listing(outside) == before
    for name in ("results.json", "report.html"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert json.loads((out / "results.json").read_text())["recurrent"].keys() >= {"cost$\\frac$"}
    assert "cost$\\frac$" in (out / "report.html").read_text()
    assert all(Path(p).resolve().is_relative_to(out.resolve()) for p in paths.values())
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_symlinked_subfolder_is_refused_even_with_overwrite(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "rep"
    out.mkdir()
    os.symlink(outside, out / "figures")
    for overwrite in (False, True):
        with pytest.raises(OutputFolderError, match=r"figures is a symlink .* does not follow "
                                                    r"links out of it"):
            check_writable(out, overwrite=overwrite)
    with pytest.raises(OutputFolderError):
        OutputFolder(out, overwrite=True).write_bytes("figures/x.png", b"png")
    assert list(outside.iterdir()) == []


def test_names_that_could_leave_the_folder_are_refused(tmp_path):
    folder = OutputFolder(tmp_path / "rep", overwrite=True)
    for bad in ("../x", "/etc/x", "a/../../x", "", "a//b", "a\\b"):
        with pytest.raises(OutputFolderError, match="not a plain name inside"):
            folder.write_bytes(bad, b"x")
    assert not (tmp_path / "rep").exists() and not (tmp_path / "x").exists()


def test_out_that_is_a_file_and_a_folder_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputFolderError, match="exists and is not a folder"):
        check_writable(tmp_path / "f", overwrite=True)
    (tmp_path / "rep" / "report.html").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match="report.html is a folder"):
        check_writable(tmp_path / "rep", overwrite=True)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    folder = OutputFolder(tmp_path, overwrite=True)
    folder.write_text("results.json", "old")

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        folder.write_text("results.json", "new")
    assert (tmp_path / "results.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        p = OutputFolder(tmp_path, overwrite=False).write_bytes("a/b.png", b"x")
    finally:
        os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o644


# ---- mathtext ------------------------------------------------------------------------------


def test_plain_makes_any_name_safe_for_mathtext(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib import cbook

    from rnnscope import plotting

    names = ["$\\frac$", "a$b$", "cost $", "\\$x$", "$$"]
    fig, ax = plt.subplots()
    for n in names:
        assert not cbook.is_math_text(plotting.plain(n))
        ax.plot([0, 1], [0, 1], label=plotting.plain(n))
        ax.plot([0, 1], [1, 0], label=plotting.plain(n) + r" next to $x_t$")
    ax.legend()
    fig.savefig(tmp_path / "ok.png")  # would raise for "$\frac$" unescaped:
    plt.close(fig)
    fig, ax = plt.subplots()
    ax.plot([0, 1], label="$\\frac$")
    ax.legend()
    with pytest.raises(ValueError):
        fig.savefig(tmp_path / "bad.png")
    plt.close(fig)


# ---- crafted results.json ------------------------------------------------------------------


def _all_paths(obj, path=()):
    """(path, value) of every node; dict keys are reported as ("key", path, key)."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield ("key",) + path + (k,), k
            yield from _all_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _all_paths(v, path + (i,))


def _replace(obj, path, value, rename=False):
    obj = copy.deepcopy(obj)
    node = obj
    for k in path[:-1]:
        node = node[k]
    if rename:
        node = {(value if k == path[-1] else k): v for k, v in node.items()}
        if len(path) == 1:
            return node
        parent = obj
        for k in path[:-2]:
            parent = parent[k]
        parent[path[-2]] = node
        return obj
    node[path[-1]] = value
    return obj


@pytest.mark.parametrize("which", ["compare", "inspect", "experiment"])
def test_script_anywhere_never_reaches_report_html_raw(which, compare_results, inspect_results,
                                                        experiment_results):
    """Every string of a results.json (and every key) replaced by markup: the file is either
    refused by the schema or drawn with the markup shown as text."""
    obj = {"compare": compare_results, "inspect": inspect_results,
           "experiment": experiment_results}[which]
    render = render_experiment_html if which == "experiment" else render_html
    figures = dict.fromkeys(EXPERIMENT_NAMES if which == "experiment" else NAMES, "AAAA")
    assert "<script" not in render(obj, figures)
    results = obj.to_dict()
    tried = rendered = 0
    for path, value in list(_all_paths(results)):
        if path and path[0] == "key":
            mutated = _replace(results, path[1:], SCRIPT, rename=True)
        elif isinstance(value, str):
            mutated = _replace(results, path, SCRIPT)
        else:
            continue
        tried += 1
        try:
            page = render(study_from_dict(mutated), figures)
        except SchemaError:  # a string where a number or a known word belongs is refused
            continue
        rendered += 1
        assert "<script" not in page.lower(), path
    assert tried > 30 and rendered > tried // 3, (tried, rendered)


CRAFTED = [
    ("missing comparison profiles", lambda r: r["comparison"].pop("profiles"),
     r"results\['comparison'\]\['profiles'\] is missing; expected an object"),
    ("recurrent is a list", lambda r: r.__setitem__("recurrent", []),
     r"results\['recurrent'\] must be an object; got a list"),
    ("seq_len a string", lambda r: r["config"].__setitem__("seq_len", "12"),
     r"results\['config'\]\['seq_len'\] must be an integer >= 1; got the string '12'"),
    ("seq_len not the profiles' length", lambda r: r["config"].__setitem__("seq_len", 7),
     r"results\['comparison'\]\['profiles'\]\['RNN'\]\['per_sample'\] must be \(samples, "
     r"seq_len=7\); got shape \(3, 6\)"),
    ("spectral rows too short", lambda r: r["recurrent"]["LSTM"]["layers"][0]["cell_jacobians"]
     .__setitem__("spectral", [[]]),
     r"results\['recurrent'\]\['LSTM'\]\['layers'\]\[0\]\['cell_jacobians'\]\['spectral'\] "
     r"must be \(B=2, T=6, ...\); got shape \(1, 0\)"),
    ("a word where a number belongs", lambda r: r["comparison"]["profiles"]["RNN"]
     .__setitem__("per_sample", [["big"] * 6] * 3),
     r"\['per_sample'\] must be a number; got the string 'big'"),
    ("markup where a number belongs", lambda r: r["recurrent"]["LSTM"]["gates"]["layers"][0]
     .__setitem__("mean", SCRIPT), r"\['mean'\] must be a number; got the string '<script>"),
    ("ragged per_sample", lambda r: r["comparison"]["profiles"]["RNN"]["per_sample"][0].pop(),
     r"\['per_sample'\] has rows of different lengths \(5 and 6\) at depth 1"),
    ("gates without layers", lambda r: r["recurrent"]["LSTM"]["gates"].pop("layers"),
     r"results\['recurrent'\]\['LSTM'\]\['gates'\]\['layers'\] is missing"),
    ("decay rows wrong", lambda r: r["decay_table"].__setitem__("rows", [1, 2]),
     r"results\['decay_table'\]\['rows'\]\[0\] must be an object; got an integer"),
    ("a list as a number", lambda r: r["recurrent"]["LSTM"]["gates"]["layers"][0]
     .__setitem__("mean", [1]), r"\['mean'\] must be a number; got a list"),
    ("a boolean as a count", lambda r: r["comparison"]["profiles"]["RNN"]
     .__setitem__("nonfinite_grads", True), r"\['nonfinite_grads'\] must be an integer >= 0; "
     r"got a boolean"),
    ("no command", lambda r: r.pop("command"), r"results\['command'\] is missing"),
    ("unknown command", lambda r: r.__setitem__("command", "train"),
     r"results\['command'\] must be one of 'compare', 'inspect', 'experiment'; got the "
     r"string 'train'"),
    ("no schema (an older rnnscope)", lambda r: r.pop("schema"),
     r"written by an older rnnscope \(no schema\); rerun the command"),
    ("another schema", lambda r: r.__setitem__("schema", SCHEMA + 1),
     rf"results\['schema'\] is {SCHEMA + 1}; this rnnscope reads schema {SCHEMA} only"),
]


@pytest.mark.parametrize("case, craft, message", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_results_give_one_line_and_write_nothing(tmp_path, compare_results, case,
                                                         craft, message):
    results = compare_results.to_dict()
    craft(results)
    src = tmp_path / "in" / "results.json"
    src.parent.mkdir()
    src.write_text(json.dumps(results))
    before = listing(tmp_path)
    with pytest.raises(ResultsError, match=message) as info:
        write_report(load_results(src), tmp_path / "out", source=str(src))
    text = str(info.value)
    assert str(src) in text and "\n" not in text
    assert listing(tmp_path) == before


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON at line 1"),
    ('{"comparison": NaN}', "bare literal NaN"),
    ("[1, 2]", "is not an rnnscope results.json"),
    (b"\xff\xfe\x00", "not UTF-8 text"),
])
def test_replot_of_files_that_are_not_results(tmp_path, capsys, content, message):
    src = tmp_path / "results.json"
    (src.write_bytes if isinstance(content, bytes) else src.write_text)(content)
    before = listing(tmp_path)
    assert cli.main(["replot", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert listing(tmp_path) == before


def test_replot_cli_names_the_file_for_a_missing_key(tmp_path, capsys, compare_results):
    results = compare_results.to_dict()
    del results["recurrent"]["LSTM"]["layers"][0]["step_paths"]
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    before = listing(tmp_path)
    assert cli.main(["replot", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rnnscope replot: error: {src}: results['recurrent']['LSTM']"
                          "['layers'][0]['step_paths'] is missing; expected an object"), err
    assert "KeyError" not in err and len(err.splitlines()) == 1
    assert listing(tmp_path) == before


# ---- plot-log ------------------------------------------------------------------------------


def _log(path: Path, records: list, alerts: list = ()) -> Path:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps({"type": "step", **r}) + "\n")
        for a in alerts:
            fh.write(json.dumps({"type": "alert", **a}) + "\n")
    return path


def _records(layers=("rnn",), steps=range(4)):
    return [{"step": s, "layers": {n: {"input_grad": [0.1 * (s + 1), 1.0, "nan"]}
                                   for n in layers}} for s in steps]


def test_plot_log_checks_every_target_before_drawing(tmp_path, capsys):
    log = _log(tmp_path / "run.jsonl", _records(("enc", "dec")))
    out = tmp_path / "plots"
    out.mkdir()
    (out / "alerts.png").write_bytes(b"mine")
    assert cli.main(["plot-log", str(log), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "alerts.png already exists; pass --overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["alerts.png"]  # no heatmap written first
    assert cli.main(["plot-log", str(log), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alerts.png", "heatmap_dec.png",
                                                     "heatmap_enc.png"]
    assert (out / "alerts.png").read_bytes() != b"mine"


def test_plot_log_layer_names_are_data_not_paths(tmp_path, capsys):
    names = ("../../evil", "a/b.c", "$\\frac$", "a_b_c")
    log = _log(tmp_path / "run.jsonl", _records(names), [{"kind": "$\\frac$", "step": 1}])
    out = tmp_path / "plots"
    before = listing(tmp_path)
    assert cli.main(["plot-log", str(log), "--out", str(out), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert {Path(f).name for f in files} == {"heatmap_______evil.png", "heatmap_a_b_c.png",
                                             "heatmap___frac_.png", "heatmap_a_b_c_2.png",
                                             "alerts.png"}
    after = listing(tmp_path)
    assert {k for k in after if k not in before} == {"plots"} | {f"plots/{Path(f).name}"
                                                                 for f in files}


@pytest.mark.parametrize("lines, message", [
    ([{"type": "step", "layers": {}}], "step record 1 has no integer 'step'"),
    ([{"type": "step", "step": "3"}], "step record 1 has no integer 'step'"),
    ([{"type": "step", "step": 1, "layers": []}], "'layers' must be an object"),
    ([{"type": "step", "step": 1, "layers": {"r": 3}}], "layer 'r' must be an object"),
    ([{"type": "step", "step": 1, "layers": {"r": {"input_grad": ["x", 1]}}}],
     "'input_grad' must be a list of numbers"),
    ([{"type": "step", "step": 1, "layers": {"r": {"input_grad": 5}}}],
     "'input_grad' must be a list of numbers"),
    ([{"type": "step", "step": 0}, {"type": "alert", "step": 1}],
     "alert 1 needs a text 'kind' and an integer 'step'"),
    ([{"type": "alert", "kind": "x", "step": 1}], "holds no step records"),
    (["[1, 2]"], "is not a monitor log record (a JSON list"),
    (["garbage"], "is not a monitor log record (invalid JSON"),
])
def test_crafted_logs_give_one_line(tmp_path, capsys, lines, message):
    log = tmp_path / "run.jsonl"
    log.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    before = listing(tmp_path)
    assert cli.main(["plot-log", str(log), "--out", str(tmp_path / "plots")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert "Error:" not in err  # no KeyError/IndexError/TypeError leaking through
    assert listing(tmp_path) == before


def test_plot_log_draws_a_log_cut_short_and_resumed(tmp_path, capsys):
    from rnnscope.monitor.loggers import JSONLLogger

    log = _log(tmp_path / "run.jsonl", _records(steps=range(3)))
    with open(log, "a") as fh:
        fh.write('{"type": "step", "step": 3, "layers": {"rnn": {"input_gr')  # killed here
    lg = JSONLLogger(log)  # the run resumes from its step-2 checkpoint
    for r in _records(steps=range(2, 6)):
        lg.log(r)
    lg.close()
    with pytest.warns(RuntimeWarning) as seen:
        assert cli.main(["plot-log", str(log), "--out", str(tmp_path / "p"), "--json"]) == 0
    text = " | ".join(str(w.message) for w in seen)
    assert "skipped 1 record(s) cut short" in text and "line(s) 4" in text
    assert "1 step record(s) were logged again" in text
    assert json.loads(capsys.readouterr().out)["steps"] == 6


def test_out_given_as_a_symlink_to_a_folder_is_where_files_go(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    OutputFolder(tmp_path / "link", overwrite=False).write_text("results.json", "{}")
    assert (real / "results.json").read_text() == "{}"
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(OutputFolderError, match="dangling is a symlink to .*nowhere, which does "
                                                "not exist"):
        OutputFolder(tmp_path / "dangling", overwrite=True).write_text("a.json", "{}")
    assert not (tmp_path / "nowhere").exists()


def test_a_drawing_failure_keeps_the_numbers_and_says_how_to_redraw(tmp_path, monkeypatch,
                                                                    compare_results):
    from rnnscope.report import figures

    def broken(results):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(figures, "ALL", (figures.decay, broken))
    out = tmp_path / "rep"
    with pytest.raises(RuntimeError, match=r"drawing the report failed \(ZeroDivisionError: "
                                           r"planted\); the numbers are saved in .*results.json: "
                                           r"'rnnscope replot .* --overwrite' redraws them"):
        write_report(copy.deepcopy(compare_results), out)
    assert sorted(listing(out)) == ["results.json"]  # nothing half-drawn
    saved = json.loads((out / "results.json").read_text())
    assert study_from_dict(saved) == compare_results


def test_overwrite_removes_figures_this_report_does_not_draw(tmp_path, monkeypatch,
                                                             compare_results):
    from rnnscope.report import figures

    monkeypatch.setattr(figures, "ALL", (figures.decay,))
    out = tmp_path / "rep"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "lag.png").write_bytes(b"an earlier run's")
    (out / "notes.txt").write_text("mine")
    write_report(copy.deepcopy(compare_results), out, overwrite=True)
    assert sorted(listing(out)) == ["figures", "figures/decay.png", "figures/decay.svg",
                                    "notes.txt", "report.html", "results.json"]


def test_markup_in_names_never_reaches_an_svg_raw(tmp_path, compare_results):
    """Module names are drawn into the SVG figures (legends, titles): as escaped text."""
    crafted = study_from_dict(json.loads(json.dumps(compare_results.to_dict())
                                         .replace('"LSTM"', json.dumps(SCRIPT))))
    assert SCRIPT in crafted.recurrent
    write_report(crafted, tmp_path / "rep")
    svgs = list((tmp_path / "rep" / "figures").glob("*.svg"))
    assert svgs
    for svg in svgs:
        assert "<script" not in svg.read_text().lower(), svg.name
    assert "<script" not in (tmp_path / "rep" / "report.html").read_text().lower()
