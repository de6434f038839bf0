"""Mutation check: plant one small bug at a time in the maths code and see if the tests notice.

Each mutant is one operator or constant change in src/rnnscope/{cells/*.py, jacobians.py,
profile.py, gates.py, results.py}: + ↔ −, * ↔ /, ** → *, @ → *, a − b → a (dropped term),
n → n + 1 (0 → 1, 1 → 2, ...), < ↔ <=, > ↔ >=, == ↔ !=, and ↔ or, .mean ↔ .sum, .amax ↔ .amin,
a dropped unary minus, and one planted bug from the issue (a 0.5 weight on the indirect energy
in the highway share). Error messages, warnings, docstrings, annotations, and the JSON/text/plot
helpers of results.py are left alone: they are not maths.

The package and its tests are copied to a temporary directory once; each mutant is written into that COPY
(the worktree is never edited) and a fast, relevant subset of the tests runs against it with
a per-mutant timeout. A mutant is "killed" when the tests fail (or time out), "survived" when
they pass. To keep it fast, one parent process imports torch, pytest and hypothesis once and
forks a child per mutant, whose `sys.path` puts the copy first (the child imports rnnscope
fresh from the copy and checks that it did).

Run from the repository root (≈ 20–30 min on 2 busy cores at the default cap):

    PYTHONPATH=src .venv/bin/python benchmarks/mutation_check.py            # default sample
    .venv/bin/python benchmarks/mutation_check.py --max 40 --seed 1         # smaller sample
    .venv/bin/python benchmarks/mutation_check.py --list                    # mutants, no runs
    .venv/bin/python benchmarks/mutation_check.py --max 0 --match "gates.py:60  -"  # re-check
    .venv/bin/python benchmarks/mutation_check.py --files results.py --max 0  # all in a file

Options: --max N (cap; 0 = every mutant), --seed (sampling), --timeout seconds per mutant,
--files (subset of the targets, by path under src/rnnscope). Prints each mutant's outcome as
it runs and, at the end, the kill rate and the surviving mutants (file:line, the change).
Exit status 0 whatever the kill rate (it is a report, not a gate).
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "rnnscope"

TARGETS = ["cells/rnn.py", "cells/lstm.py", "cells/gru.py", "cells/custom.py",
           "cells/layer_trace.py", "jacobians.py", "profile.py", "gates.py", "results.py"]

DERIVED = "tests/test_derived_quantities.py"
# fast, relevant tests per target (run with -x: the first failure kills the mutant)
TESTS = {
    "cells/": [DERIVED, "tests/test_replay.py",
               "tests/test_jacobians.py::test_cell_jacobians_equal_autograd_on_the_reference_loop",
               "tests/test_jacobians.py::test_step_jacobians_split_exactly",
               "tests/test_jacobians.py::test_custom_cells_everywhere",
               "tests/test_jacobians.py::test_state_gradients_equal_retain_grad_on_the_reference_loop"],
    "jacobians.py": [DERIVED, "tests/test_jacobians.py"],
    "profile.py": [DERIVED, "tests/test_profile.py"],
    "gates.py": [DERIVED, "tests/test_gates.py"],
    "results.py": [DERIVED, "tests/test_profile.py::test_summaries_from_known_norms",
                   "tests/test_profile.py::test_effective_memory_function",
                   "tests/test_jacobians.py::test_spectral_norm_helper_matches_svd_at_every_scale",
                   "tests/test_jacobians.py::test_cell_jacobians_equal_autograd_on_the_reference_loop",
                   "tests/test_jacobians.py::test_step_jacobians_split_exactly"],
}

# results.py: only the computing code (the rest formats, serialises or plots)
RESULTS_SKIP = {"json_number", "json_list", "to_dict", "from_dict", "plot",
                "__str__", "__repr__", "format_number", "format_table", "table",
                "same_value", "_describe", "__eq__", "_headline", "_repr_fields", "_repr_html_",
                "_jacobian_fields_to_dict", "_jacobian_common", "_check_lead", "_shape_error",
                "_jacobian_headline"}

# (file, exact source text, replacement, description): bugs named in the issues
PLANTED = [("jacobians.py", "d2 / (d2 + rest2)", "d2 / (d2 + 0.5 * rest2)",
            "highway share ‖D‖²/(‖D‖² + 0.5‖J−D‖²) (issue 12)")]

# survivors examined and found equivalent (no input can tell them apart), with the reason;
# printed next to a survivor so that a rerun needs no re-examination
# keyed by (file, the mutated source line stripped, the change)
EQUIVALENT = {
    ("cells/layer_trace.py", "if min_len >= T:", ">= -> >"):
        "at min_len == T every step has t < min_len, so both branches give [None] * T",
    ("profile.py", "seed=seed, expect=x.shape[:2])", "constant 2 -> 3"):
        "expect=x.shape[:2] vs [:3]: only expect[0] and expect[1] are ever read",
    ("results.py", "if top <= 0:", "<= -> <"):
        "at top == 0 no norm is positive, so n / top is nan or -inf and none is counted",
}

BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
              ast.Pow: ast.Mult, ast.MatMult: ast.Mult, ast.FloorDiv: ast.Div}
CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
METHOD_SWAP = {"mean": "sum", "sum": "mean", "amax": "amin", "amin": "amax", "max": "min",
               "min": "max", "flip": None}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**",
          ast.MatMult: "@", ast.FloorDiv: "//", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
          ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    file: str          # under src/rnnscope
    line: int
    change: str
    priority: int      # 1 arithmetic, 2 comparisons and reductions, 3 logic
    index: int = -1    # position of the node in the file's walk (-1: planted text edit)
    kind: str = ""
    text: tuple | None = None  # planted: (old, new)

    def label(self) -> str:
        return f"{self.file}:{self.line}  {self.change}"


# ----------------------------------------------------------------------------------------------
# finding mutation points


def _skip_nodes(tree: ast.AST, file: str) -> set:
    """ids of nodes not to mutate: inside raise/warn/f-strings/annotations/docstrings, and in
    results.py the non-computing methods."""
    skip = set()

    def mark(node):
        for n in ast.walk(node):
            skip.add(id(n))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert)):
            mark(node)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("warn", "ValueError", "TypeError", "RuntimeError"):
                mark(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in node.args.args + node.args.kwonlyargs:
                if a.annotation is not None:
                    mark(a.annotation)
            if node.returns is not None:
                mark(node.returns)
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                mark(d)  # default option values are not maths
            if file == "results.py" and node.name in RESULTS_SKIP:
                mark(node)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                  for t in node.targets):
            mark(node)
    return skip


def _points(tree: ast.AST, file: str) -> list[Mutant]:
    skip = _skip_nodes(tree, file)
    out = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        ln = node.lineno
        if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAP:
            a, b = SYMBOL[type(node.op)], SYMBOL[BINOP_SWAP[type(node.op)]]
            out.append(Mutant(file, ln, f"{a} -> {b}", 1, i, "binop"))
            if isinstance(node.op, (ast.Add, ast.Sub)):
                out.append(Mutant(file, ln, f"a {a} b -> a (dropped term)", 1, i, "drop"))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and \
                type(node.ops[0]) in CMP_SWAP:
            a, b = SYMBOL[type(node.ops[0])], SYMBOL[CMP_SWAP[type(node.ops[0])]]
            out.append(Mutant(file, ln, f"{a} -> {b}", 2, i, "cmp"))
        elif isinstance(node, ast.BoolOp):
            a = SYMBOL[type(node.op)]
            out.append(Mutant(file, ln, f"{a} -> {'or' if a == 'and' else 'and'}", 3, i, "bool"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            out.append(Mutant(file, ln, "dropped unary minus", 1, i, "neg"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            v = node.value
            out.append(Mutant(file, ln, f"constant {v!r} -> {_bump(v)!r}", 2, i, "const"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in METHOD_SWAP:
            new = METHOD_SWAP[node.func.attr]
            if new is None:  # .flip(d) -> no flip
                out.append(Mutant(file, ln, f".{node.func.attr}(...) dropped", 2, i, "noflip"))
            else:
                out.append(Mutant(file, ln, f".{node.func.attr} -> .{new}", 2, i, "method"))
    return out


def _bump(v):
    return v + 1 if isinstance(v, int) else (1.0 if v == 0 else v * 2)


class _Apply(ast.NodeTransformer):
    def __init__(self, m: Mutant):
        self.m = m
        self.order = {}

    def visit(self, node):
        i = self.order.get(id(node))
        if i == self.m.index:
            return self.mutate(node)
        return super().visit(node)

    def mutate(self, node):
        k = self.m.kind
        if k == "binop":
            node.op = BINOP_SWAP[type(node.op)]()
        elif k == "drop":
            return node.left
        elif k == "cmp":
            node.ops = [CMP_SWAP[type(node.ops[0])]()]
        elif k == "bool":
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif k == "neg":
            return node.operand
        elif k == "const":
            node.value = _bump(node.value)
        elif k == "method":
            node.func.attr = METHOD_SWAP[node.func.attr]
        elif k == "noflip":
            return node.func.value
        return node


def mutated_source(source: str, m: Mutant) -> str:
    if m.text is not None:
        old, new = m.text
        return source.replace(old, new, 1)
    tree = ast.parse(source)
    tr = _Apply(m)
    tr.order = {id(n): i for i, n in enumerate(ast.walk(tree))}
    new = tr.visit(tree)
    ast.fix_missing_locations(new)
    return ast.unparse(new)


def all_mutants(files) -> list[Mutant]:
    out = []
    for f in files:
        src = (PKG / f).read_text()
        out += _points(ast.parse(src), f)
    for f, old, new, what in PLANTED:
        if f in files and old in (PKG / f).read_text():
            out.append(Mutant(f, _line_of((PKG / f).read_text(), old), f"planted: {what}", 0,
                              kind="planted", text=(old, new)))
    return out


def _line_of(src: str, text: str) -> int:
    return src[:src.index(text)].count("\n") + 1


def sample(mutants: list[Mutant], cap: int, seed: int) -> list[Mutant]:
    """Planted mutants always; the rest shared among the files in proportion to their
    mutation points (at least 3 each), drawn per file with weights favouring arithmetic
    (priority 1: 3, 2: 2, 3: 1), seeded."""
    if cap <= 0 or len(mutants) <= cap:
        return mutants
    rng = random.Random(seed)
    chosen = [m for m in mutants if m.priority == 0]
    by_file: dict[str, list] = {}
    for m in mutants:
        if m.priority != 0:
            by_file.setdefault(m.file, []).append(m)
    total = sum(len(v) for v in by_file.values())
    budget = cap - len(chosen)
    weight = {1: 3.0, 2: 2.0, 3: 1.0}
    for _file, ms in by_file.items():
        k = min(len(ms), max(3, round(budget * len(ms) / total)))
        keyed = sorted(ms, key=lambda m: -rng.random() ** (1 / weight[m.priority]))
        chosen += keyed[:k]  # weighted sampling without replacement (Efraimidis–Spirakis)
    return sorted(chosen, key=lambda m: (m.file, m.line))


# ----------------------------------------------------------------------------------------------
# running


def tests_for(file: str) -> list[str]:
    return TESTS["cells/"] if file.startswith("cells/") else TESTS[file]


def run_one(copy_pkg: Path, m: Mutant, timeout: float) -> tuple[str, float]:
    """Fork a child that runs the tests against the copy; returns (outcome, seconds)."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest

            import rnnscope

            if not Path(rnnscope.__file__).resolve().is_relative_to(copy_pkg.resolve()):
                os._exit(3)  # imported the wrong package: refuse to report
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                                *tests_for(m.file)])
            os._exit(0 if code == 0 else 1)
        except BaseException:
            os._exit(1)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - t0
        time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    if code == 3:
        raise SystemExit("the child imported rnnscope from outside the temporary copy")
    return ("survived" if code == 0 else "killed"), time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max", type=int, default=80, help="mutants to run (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant")
    ap.add_argument("--files", nargs="*", default=TARGETS)
    ap.add_argument("--match", nargs="*", default=None,
                    help="only mutants whose label contains one of these (e.g. "
                         "'cells/custom.py:27'), before sampling")
    ap.add_argument("--list", action="store_true", help="list the sampled mutants and exit")
    args = ap.parse_args(argv)
    unknown = [f for f in args.files if f not in TARGETS]
    if unknown:
        ap.error(f"--files must be among {TARGETS}; got {unknown}")
    mutants = all_mutants(args.files)
    if args.match:
        mutants = [m for m in mutants if any(s in m.label() for s in args.match)]
    chosen = sample(mutants, args.max, args.seed)
    print(f"{len(mutants)} mutation points in {len(args.files)} files; running {len(chosen)}")
    if args.list:
        for m in chosen:
            print("  " + m.label())
        return 0

    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant must never be read from a stale .pyc
    sys.dont_write_bytecode = True
    os.environ.setdefault("HYPOTHESIS_PROFILE", "dev")
    tmp = Path(tempfile.mkdtemp(prefix="rnnscope-mutants-"))
    try:
        shutil.copytree(ROOT / "src", tmp / "src")
        # the tests too: editing them while a run goes on must not change it
        shutil.copytree(ROOT / "tests", tmp / "tests",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
        os.chdir(tmp)
        copy_pkg = tmp / "src" / "rnnscope"
        sys.path.insert(0, str(tmp / "src"))
        # heavy imports once, in the parent; rnnscope itself only ever in the children
        import hypothesis  # noqa: F401
        import pytest  # noqa: F401
        import torch  # noqa: F401

        assert "rnnscope" not in sys.modules
        # the unmutated copy must pass every subset (else nothing below means anything)
        for f in sorted({("cells/x" if f.startswith("cells/") else f) for f in args.files}):
            probe = Mutant(f if not f.startswith("cells/") else "cells/lstm.py", 0, "none", 0,
                           kind="planted", text=("", ""))
            outcome, secs = run_one(copy_pkg, probe, args.timeout * 2)
            print(f"baseline {probe.file}: {outcome} ({secs:.0f} s)")
            if outcome != "survived":
                raise SystemExit(f"the unmutated tests for {probe.file} do not pass; fix that "
                                 "first")
        results = []
        t_all = time.monotonic()
        for n, m in enumerate(chosen, 1):
            path = copy_pkg / m.file
            original = path.read_text()
            try:
                path.write_text(mutated_source(original, m))
                outcome, secs = run_one(copy_pkg, m, args.timeout)
            finally:
                path.write_text(original)
            results.append((m, outcome))
            print(f"[{n}/{len(chosen)}] {outcome:8s} {secs:5.0f} s  {m.label()}", flush=True)
        killed = sum(o != "survived" for _, o in results)
        print(f"\nkill rate: {killed}/{len(results)} = {killed / max(len(results), 1):.1%} "
              f"({time.monotonic() - t_all:.0f} s)")
        surv = [m for m, o in results if o == "survived"]
        if surv:
            print("survivors:")
            for m in surv:
                text = (PKG / m.file).read_text().splitlines()[m.line - 1].strip()
                why = EQUIVALENT.get((m.file, text, m.change))
                print("  " + m.label() + (f"   [equivalent: {why}]" if why else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
