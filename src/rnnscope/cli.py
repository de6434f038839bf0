"""The `rnnscope` command line (also `python -m rnnscope`).

Strict by design: unknown, mistyped or abbreviated options fail with exit code 2 and one line;
analysis errors exit 1 with a clear message and no traceback. The resolved configuration is
printed (unless --quiet/--json) and saved in results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings

EXIT_USAGE, EXIT_FAILURE = 2, 1


class UsageError(Exception):
    """A command-line mistake: exit 2 with one line."""


class StrictParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2 — no usage dump
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _jacobian_samples(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got "
                                         f"{text!r}") from None


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {text!r}")
    return v


def _positive_float(text: str) -> float:
    """A finite number > 0 (inf and nan are refused: they would train to NaN or fail later,
    writing JSON)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _csv(kind, allowed=None):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            vals = [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, "
                                             f"got {text!r}") from None
        if kind is float and not all(math.isfinite(v) for v in vals):
            raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
        if allowed is not None:
            bad = [v for v in vals if v not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown value(s) {', '.join(map(str, bad))}; "
                                                 f"choose from {', '.join(allowed)}")
            twice = sorted({v for v in vals if vals.count(v) > 1})
            if twice:  # a name is one model or variant: a second copy would be dropped
                raise argparse.ArgumentTypeError(f"{', '.join(twice)} given more than once")
        return vals
    return parse


def _kind_name(text: str) -> str:
    """A model or variant name, case-insensitive ("LRU" is "lru")."""
    return text.lower()


class Progress:
    """A progress bar on stderr when it is a terminal; silent otherwise or with --quiet."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done = max(total, 1), 0
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, stage: str) -> None:
        self.done = min(self.done + 1, self.total)
        if self.enabled:
            width = 24
            fill = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                             f"{stage[:48]:<48s}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\r{' ' * 90}\r")
            sys.stderr.flush()


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but CUDA is not available on this machine; "
                           "use --device cpu or auto")
    return name


def _say(args, text: str = "") -> None:
    if not (args.quiet or args.json):
        print(text)


def _print_config(args, config: dict) -> None:
    if getattr(args, "no_report", False) and "out" in config:
        config = {**config, "out": "none (--no-report)"}
    _say(args, "configuration: " + ", ".join(f"{k}={v}" for k, v in config.items()))


def _check_out(args) -> None:
    """Refuse up front, before minutes of work, to overwrite a report the user has."""
    from .report.write import check_writable

    if not getattr(args, "no_report", False):
        # every file the report may write (results.json, report.html, figures/*), not only
        # the page: see report.write.report_targets
        check_writable(args.out, overwrite=args.overwrite, command=args.command)


def _write(args, results) -> dict:
    from .report import write_report

    paths = write_report(results, args.out, overwrite=args.overwrite)
    _say(args, f"\nreport:  {paths['html']}\nresults: {paths['results']}")
    return paths


def _emit(args, results, paths: dict | None) -> None:
    """The summary of a `StudyResult`: its table, as text or (--json) JSON."""
    from .codec import dumps, encode_value

    if args.json:
        out = {"command": results.command, "config": encode_value(results.config),
               "table": encode_value(results.comparison.table()), "files": paths or {},
               "seconds": results.seconds}
        print(dumps(out))
    else:
        _say(args, str(results.comparison))


def _cmd_compare(args) -> int:
    from .studies import compare_study, jacobian_samples_for

    device = _resolve_device(args.device)
    _check_out(args)
    jac = jacobian_samples_for(args.jacobian_samples, args.seq_len, args.samples)
    config = {"models": ",".join(args.models), "seq_len": args.seq_len,
              "hidden_size": args.hidden_size, "input_size": args.input_size,
              "samples": args.samples, "layers": args.layers, "forget_bias": args.forget_bias,
              "seed": args.seed, "device": device,
              "jacobian_samples": f"{jac} (auto)" if args.jacobian_samples == "auto" else jac,
              "out": args.out}
    _print_config(args, config)
    recurrent = [m for m in args.models if m != "transformer"]
    total = 1 + sum(args.layers + (m != "rnn") + 1 for m in recurrent)
    progress = Progress(total, not args.quiet)
    try:
        results = compare_study(models=tuple(args.models), seq_len=args.seq_len,
                                hidden_size=args.hidden_size, input_size=args.input_size,
                                samples=args.samples, num_layers=args.layers,
                                forget_init=args.forget_bias, seed=args.seed, device=device,
                                jac_samples=jac,
                                progress=progress)
    finally:
        progress.close()
    paths = None if args.no_report else _write(args, results)
    _emit(args, results, paths)
    return 0


def _cmd_inspect(args) -> int:
    import torch

    from .loader import load_batch, load_inputs, load_loss, load_model, load_weights
    from .recurrent import describe, is_recurrent
    from .studies import inspect_study

    device = _resolve_device(args.device)
    _check_out(args)
    if args.inputs and args.batch:
        raise UsageError("rnnscope inspect: error: give --inputs FILE.pt or --batch FILE.py:FN, "
                         "not both")
    torch.manual_seed(args.seed)
    model = _user_code(f"the model factory {args.model}", load_model, args.model, device=device)
    weights = load_weights(model, args.weights) if args.weights else None
    model.eval()  # dropout off: measurements are deterministic and replayable
    inputs = None
    if args.inputs:
        inputs = load_inputs(args.inputs, model)
    elif args.batch:
        inputs = _user_code(f"the batch function {args.batch}", load_batch, args.batch, model)
    if inputs is not None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        inputs = inputs.to(device, dtype=dtype)
    loss = args.loss if args.loss in ("last", "all") else load_loss(args.loss)
    config = {"model": args.model, "weights": args.weights, "inputs": args.inputs or args.batch,
              "at": args.at, "loss": args.loss, "time_dim": args.time_dim,
              "seq_len": args.seq_len, "samples": args.samples, "seed": args.seed,
              "jacobian_samples": args.jacobian_samples, "device": device, "out": args.out}
    if inputs is not None:  # --seq-len and --samples only shape random inputs
        del config["seq_len"], config["samples"]
    _print_config(args, config)
    if weights is not None and (weights.key or weights.prefix):
        found = [f"checkpoint key {weights.key!r}" if weights.key else "",
                 f"key prefix {weights.prefix!r} removed" if weights.prefix else ""]
        _say(args, "weights: " + ", ".join(f for f in found if f))
    recs = [describe(m) for m in model.modules() if is_recurrent(m)]
    total = 1 + (loss != "last") + sum(s.num_layers * s.num_directions + (s.kind != "rnn") + 1
                                       for s in recs)
    progress = Progress(total, not args.quiet)
    try:
        results = inspect_study(model, inputs=inputs, at=args.at, loss=loss,
                                time_dim=args.time_dim, seq_len=args.seq_len,
                                samples=args.samples, seed=args.seed,
                                jac_samples=args.jacobian_samples, label=args.model,
                                source=args.model, input_size=args.input_size,
                                progress=progress)
    finally:
        progress.close()
    import dataclasses

    results = dataclasses.replace(results, config={
        **results.config, "weights": args.weights, "inputs_file": args.inputs,
        "batch": args.batch, "device": device})
    paths = None if args.no_report else _write(args, results)
    _emit(args, results, paths)
    return 0


class UserCodeError(RuntimeError):
    """The user's own code (a model factory, a batch or loss function, a model's forward)
    raised something that is not an ordinary error, e.g. SystemExit: exit 1 with one line."""


def _describe_base_exception(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"SystemExit (exit code {e.code!r})"
    return f"{type(e).__name__}({str(e)!r})" if str(e) else type(e).__name__


def _user_code(what: str, f, *args, **kwargs):
    """Run a loader that calls the user's code; a SystemExit or another BaseException from it
    becomes one clear line (rnnscope's exit code, not the one the code asked for)."""
    try:
        return f(*args, **kwargs)
    except (KeyboardInterrupt, Exception):
        raise
    except BaseException as e:  # noqa: BLE001 - SystemExit, GeneratorExit, custom subclasses
        raise UserCodeError(f"{what} raised {_describe_base_exception(e)} instead of returning; "
                            "it must return a torch.nn.Module (or, for --batch, the forward "
                            "arguments)") from None


def _cmd_decay(args) -> int:
    from .theory import decay_table

    table = decay_table(tuple(args.forget), tuple(args.lengths))
    if args.json:
        print(json.dumps(table.to_dict(), indent=1, allow_nan=False))
    else:
        print("Gradient factor f^L through the direct cell-state path for a constant forget "
              "gate f,\nand the memory time 1/(1-f) in steps:\n")
        print(table)
    return 0


def _cmd_replot(args) -> int:
    from .report import load_results, write_report
    from .report.write import check_writable

    results = load_results(args.results)  # validated against the schema, or refused
    check_writable(args.out, overwrite=args.overwrite, command=results.command)
    # drawn in memory first: a file that cannot be drawn writes nothing and names itself
    paths = write_report(results, args.out, overwrite=args.overwrite, source=args.results)
    if args.json:
        print(json.dumps({"files": paths}, indent=1))
    else:
        _say(args, f"report:  {paths['html']}")
    return 0


def _cmd_plot_log(args) -> int:
    import matplotlib.pyplot as plt

    from . import plotting
    from .monitor.loggers import check_plot_records, read_jsonl
    from .report.safe_write import OutputFolder

    steps, alerts = check_plot_records(*read_jsonl(_monitor_log(args.log)), args.log)
    layers = list(dict.fromkeys(k for r in steps for k in r.get("layers", {})))
    names = _heatmap_file_names(layers)
    # every target is checked before anything is drawn or written
    folder = OutputFolder(args.out, overwrite=args.overwrite)
    folder.check([*names.values(), "alerts.png"])
    files = {}  # drawn in memory first, written when all succeeded
    for layer in layers:
        fig = plotting.plot_lag_heatmap(steps, layer)
        if fig is None:
            continue
        files[names[layer]] = _png(fig)
        plt.close(fig)
    fig = plotting.plot_alert_timeline(alerts, [r["step"] for r in steps])
    files["alerts.png"] = _png(fig)
    plt.close(fig)
    written = [str(folder.write_bytes(rel, data)) for rel, data in files.items()]
    if args.json:
        print(json.dumps({"files": written, "steps": len(steps), "alerts": len(alerts)}))
    else:
        _say(args, f"{len(steps)} steps, {len(alerts)} alerts\n" + "\n".join(written))
    return 0


def _monitor_log(path: str) -> str:
    """The JSON Lines file plot-log reads: the path itself, or the monitor's log inside the
    folder it was given (what `loggers="runs/exp1"` writes). A CSV log is refused by name."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        inside = p / "rnnscope-monitor.jsonl"
        if not inside.is_file():
            raise ValueError(f"{path} is a folder without rnnscope-monitor.jsonl (the log a "
                             "GradientMonitor writes when loggers= names a folder); give the "
                             ".jsonl file")
        return str(inside)
    if p.suffix.lower() == ".csv":
        raise ValueError(f"{path} is a CSV log; plot-log draws the JSON Lines log (a .jsonl "
                         "file, or the folder the monitor logged to): log with "
                         "loggers=\"run.jsonl\" as well to plot a run")
    return path


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _heatmap_file_names(layers: list[str]) -> dict[str, str]:
    """{layer: "heatmap_<name>.png"}: letters, digits, '-' and '_' only, at most 100 of them,
    distinct (a layer name from a log is data, never a path)."""
    import re

    out, used = {}, set()
    for layer in layers:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", layer)[:100] or "_"
        name, n = f"heatmap_{stem}.png", 2
        while name in used:
            name, n = f"heatmap_{stem}_{n}.png", n + 1
        used.add(name)
        out[layer] = name
    return out


def _cmd_experiment(args) -> int:
    from .codec import dumps, encode_value
    from .experiments import ExperimentConfig, run_experiment
    from .results import format_table
    from .study_results import EXPERIMENT_HEADERS, experiment_result

    device = _resolve_device(args.device)
    _check_out(args)
    cfg = ExperimentConfig(task=args.task, T=args.T, steps=args.steps,
                           batch_size=args.batch_size, hidden_size=args.hidden_size, lr=args.lr,
                           clip=args.clip, variants=tuple(args.variants), seed=args.seed,
                           device=device)
    cfg.check()
    _print_config(args, {k: (",".join(v) if isinstance(v, tuple) else v)
                         for k, v in cfg.__dict__.items()})
    progress = Progress(20 * len(cfg.variants), not args.quiet)
    try:
        results = experiment_result(run_experiment(cfg, progress=progress))
    finally:
        progress.close()
    paths = None if args.no_report else _write(args, results)
    if args.json:
        print(dumps({"command": "experiment", "config": encode_value(results.config),
                     "baseline": results.baseline,
                     "table": encode_value(results.display_table()),
                     "files": paths or {}, "seconds": results.seconds}))
    else:
        _say(args, f"\n{args.task} task, T={args.T}: memoryless baseline "
                   f"{results.baseline:.6f}; {results.seconds:.0f} s")
        _say(args, format_table(results.display_table(), EXPERIMENT_HEADERS))
    return 0


def _common(p: argparse.ArgumentParser, *, jacobians: bool = True) -> None:
    """Options of the commands that analyse and write a report."""
    p.add_argument("--seed", type=_seed, default=0, help="random seed for weights and inputs "
                   "(default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to compute (default auto: cuda if available)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, no messages (warnings about the data still print)")
    p.add_argument("--out", default="rnnscope-report", metavar="DIR",
                   help="report folder (default ./rnnscope-report)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing report.html/results.json in --out")
    p.add_argument("--no-report", action="store_true", help="print the table only")
    if jacobians:
        p.add_argument("--jacobian-samples", type=_jacobian_samples, default="auto",
                       metavar="N|auto",
                       help="samples the Jacobian analyses use (default auto: 4 up to 250 "
                            "steps, then 1000 // steps, at least 1; every Jacobian costs an "
                            "exact spectral norm)")


def _output_options(p: argparse.ArgumentParser, default_out: str) -> None:
    """--out/--overwrite/--json/--quiet for commands that only draw files."""
    p.add_argument("--out", default=default_out, metavar="DIR",
                   help=f"output folder (default ./{default_out})")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    p.add_argument("--quiet", action="store_true",
                   help="no messages (warnings about the data still print)")


def build_parser() -> StrictParser:
    from .models import DEFAULT_KINDS, FORGET_INITS, MODEL_KINDS

    p = StrictParser(prog="rnnscope", description="Measure and explain gradient flow back "
                     "through time in recurrent networks.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=StrictParser)
    sub.required = True

    c = sub.add_parser("compare", help="RNN vs LSTM vs GRU vs Transformer gradient flow report",
                       description="Compare gradient flow of freshly initialised models on the "
                       "same seeded inputs; write report.html, figures and results.json.")
    c.add_argument("--models", type=_csv(_kind_name, MODEL_KINDS), default=list(DEFAULT_KINDS),
                   help=f"comma-separated kinds from {','.join(MODEL_KINDS)}, any case "
                   f"(default {','.join(DEFAULT_KINDS)})")
    c.add_argument("--seq-len", type=_positive_int, default=100, metavar="T",
                   help="sequence length (default 100)")
    c.add_argument("--hidden-size", type=_positive_int, default=128, metavar="H",
                   help="hidden units, also the Transformer's width (default 128)")
    c.add_argument("--input-size", type=_positive_int, default=64, metavar="I",
                   help="input features per step (default 64)")
    c.add_argument("--samples", type=_positive_int, default=50, metavar="S",
                   help="random input sequences for the gradient profiles (default 50)")
    c.add_argument("--layers", type=_positive_int, default=1, metavar="L",
                   help="recurrent / encoder layers (default 1)")
    c.add_argument("--forget-bias", choices=FORGET_INITS, default="default",
                   help="LSTM/GRU forget (retain) gate initialisation: PyTorch default, an "
                   "effective bias of 1.0, or chrono (Tallec & Ollivier 2018, t_max = T)")
    _common(c)
    c.set_defaults(func=_cmd_compare)

    i = sub.add_parser("inspect", help="analyse your own model",
                       description="Analyse a user's model: input-gradient profile and, for "
                       "every recurrent submodule, state gradients, Jacobians and gates.")
    i.add_argument("model", metavar="MODEL", help="package.module:factory, path/file.py:factory "
                   "(a callable returning an nn.Module) or a TorchScript file")
    i.add_argument("--weights", metavar="FILE", help="state dict to load (torch.load with "
                   "weights_only=True: files needing arbitrary unpickling are refused)")
    i.add_argument("--inputs", metavar="FILE.pt", help="the model's forward arguments, saved "
                   "with torch.save: a tensor (the first argument: features in the model's own "
                   "layout, token ids or a PackedSequence), a tuple/list of positional "
                   "arguments or a dict of keyword arguments (weights_only load)")
    i.add_argument("--batch", metavar="FILE.py:FN", help="a function returning the forward "
                   "arguments in the same forms as --inputs (runs your code, like MODEL)")
    i.add_argument("--at", metavar="NAME", help="measure the gradient at this submodule's "
                   "input (a name from model.named_modules(), or 'input'); default: the "
                   "model's input if it is floating point, else the first recurrent "
                   "submodule's input")
    i.add_argument("--loss", default="last", metavar="last|all|FILE.py:FN",
                   help="last: output features at each sequence's last step (default); all: "
                   "every step, also shows the lag-resolved profile; or a function of the "
                   "model's output returning (B,) or per-step (B, T) losses")
    i.add_argument("--time-dim", type=int, choices=(0, 1), metavar="0|1",
                   help="which dimension of the model's input and output is time, when the "
                   "recurrent submodules cannot tell (batch and time of the same size)")
    i.add_argument("--input-size", type=_positive_int, metavar="I",
                   help="features per step of the random inputs (default: the model's own "
                   "input_size, else its first recurrent submodule's)")
    i.add_argument("--seq-len", type=_positive_int, default=100, metavar="T",
                   help="length of the random inputs when --inputs is not given (default 100)")
    i.add_argument("--samples", type=_positive_int, default=16, metavar="S",
                   help="number of random input sequences (default 16)")
    _common(i)
    i.set_defaults(func=_cmd_inspect)

    from .experiments import DEFAULT_VARIANTS, VARIANTS

    e = sub.add_parser("experiment", help="train variants on the copy or adding task",
                       description="Train model variants on a long-memory task while the "
                       "GradientMonitor records gradient flow; report learning curves against "
                       "the exact baseline, gradient flow at init and end, and gate memory "
                       "times. The default (adding, T=50, 3000 steps, 5 variants) finishes in "
                       "under 5 minutes on 2 CPU cores.")
    e.add_argument("task", choices=("copy", "adding"))
    e.add_argument("--T", type=_positive_int, default=50, help="delay / sequence length "
                   "(default 50)")
    e.add_argument("--steps", type=_positive_int, default=3000,
                   help="training steps per variant (default 3000)")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="(default 64)")
    e.add_argument("--hidden-size", type=_positive_int, default=64, help="(default 64)")
    e.add_argument("--lr", type=_positive_float, default=3e-3,
                   help="Adam learning rate (default 3e-3)")
    e.add_argument("--clip", type=_positive_float, default=1.0,
                   help="gradient-norm clipping bound (default 1.0)")
    e.add_argument("--variants", type=_csv(_kind_name, tuple(VARIANTS)),
                   default=list(DEFAULT_VARIANTS),
                   help=f"comma-separated from {','.join(VARIANTS)}, any case (default "
                   f"{','.join(DEFAULT_VARIANTS)})")
    _common(e, jacobians=False)
    e.set_defaults(func=_cmd_experiment)

    d = sub.add_parser("decay", help="the gradient-decay table f^L and memory times",
                       description="Print f^L for constant forget gates f over lengths L.")
    d.add_argument("--forget", type=_csv(float), default=[0.9, 0.95, 0.99, 0.999],
                   metavar="F,F,...", help="forget-gate values (default 0.9,0.95,0.99,0.999)")
    d.add_argument("--lengths", type=_csv(int), default=[100, 500, 1000], metavar="L,L,...",
                   help="sequence lengths (default 100,500,1000)")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=_cmd_decay)

    r = sub.add_parser("replot", help="redraw a report from a saved results.json",
                       description="Redraw figures and report.html from results.json.")
    r.add_argument("results", metavar="RESULTS.json")
    _output_options(r, "rnnscope-report")
    r.set_defaults(func=_cmd_replot)

    pl = sub.add_parser("plot-log", help="heatmap and alert timeline of a monitor log",
                        description="Draw the gradient-flow-over-training heatmap (lag × "
                        "training step, log colour) per layer and the alert timeline from a "
                        "GradientMonitor JSON Lines log.")
    pl.add_argument("log", metavar="RUN.jsonl",
                    help="the monitor's JSON Lines log, or the folder it logged to")
    _output_options(pl, "rnnscope-monitor-plots")
    pl.set_defaults(func=_cmd_plot_log)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    # a printed warning reads as the command's own line, not Python's file:line and source;
    # only its format changes, so a caller recording warnings (catch_warnings(record=True),
    # pytest.warns) still receives them
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _warning_format(args.command)
    try:
        return args.func(args)
    except UsageError as e:  # a usage mistake found after parsing (e.g. exclusive options)
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rnnscope: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError, ImportError, MemoryError) as e:
        if os.environ.get("RNNSCOPE_DEBUG"):
            raise
        text = _one_line(e, args.command)
        if args.command == "inspect":
            text = _in_flags(text)
        print(f"rnnscope {args.command}: error: {text}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - a user's model can raise anything
        if os.environ.get("RNNSCOPE_DEBUG"):
            raise
        print(f"rnnscope {args.command}: error: {type(e).__name__}: {_one_line(e)} (set "
              "RNNSCOPE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    except BaseException as e:  # noqa: BLE001 - SystemExit etc. from the user's code
        if os.environ.get("RNNSCOPE_DEBUG"):
            raise
        print(f"rnnscope {args.command}: error: the user's code (the model's forward or a "
              f"--batch/--loss function) raised {_describe_base_exception(e)} during the "
              "analysis; rnnscope stopped without results", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        warnings.formatwarning = formatwarning


# The API's advice in an error, as `inspect`'s options say it ("pass time_dim=0" -> "pass
# --time-dim 0"): the messages come from the functions the command calls.
_FLAG_WORDS = ((re.compile(r"\btime_dim=(\d)"), r"--time-dim \1"),
               (re.compile(r"\(time_dim=\)"), "(--time-dim)"),
               (re.compile(r"\bleave at=None\b"), "leave out --at"),
               (re.compile(r"\bat='([^']*)'"), r"--at \1"),
               (re.compile(r"\bpass loss= a callable"), "pass --loss file.py:function, a callable"),
               (re.compile(r"\bpass inputs \(or input_size=\)"),
                "pass --inputs (or --input-size)"))


def _in_flags(text: str) -> str:
    for pattern, words in _FLAG_WORDS:
        text = pattern.sub(words, text)
    return text


def _warning_format(command: str):
    """warnings.formatwarning for the command line: "rnnscope CMD: warning: message"."""
    def fmt(message, category, filename, lineno, line=None):
        return f"rnnscope {command}: warning: {_one_line(message)}\n"

    return fmt


def _one_line(e: BaseException, command: str = "") -> str:
    """An error message on one line (a model's own multi-line message is joined), without
    repeating the command's name that the prefix already gives."""
    text = " ".join(str(e).split("\n")).strip() or type(e).__name__
    return text.removeprefix(f"{command}: ") if command else text


if __name__ == "__main__":
    sys.exit(main())
