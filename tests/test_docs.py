"""The documentation runs: every ```python block of README.md and every `>>>` docstring example.

README blocks run one by one, each in a fresh namespace inside a temporary directory, so each
block must carry its own imports. A block that is a template rather than a program (e.g. a
training loop around the reader's own model) is preceded by the line

    <!-- readme-test: skip (why) -->

which renders as nothing on the page and must give its reason.
"""
import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import rnnscope

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((?P<why>[^)]+)\) -->")
FENCE = re.compile(r"^```python\n(?P<code>.*?)^```", re.S | re.M)
OPTIONAL = {"matplotlib", "numpy", "lightning", "pytorch_lightning", "tensorboard"}


def readme_blocks() -> list:
    """pytest params, one per ```python block: (first line number, code), skip marks applied."""
    text = README.read_text()
    params = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.fullmatch(before.strip())
        marks = [pytest.mark.skip(reason=f"README:{line} {skip['why']}")] if skip else []
        params.append(pytest.param(m["code"], id=f"README.md:{line}", marks=marks))
    return params


def test_readme_has_python_examples():
    blocks = readme_blocks()
    runnable = [p for p in blocks if not p.marks]
    assert len(blocks) >= 3 and len(runnable) >= 2


@pytest.mark.parametrize("code", readme_blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes stays in the test's directory
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(rnnscope.__path__, "rnnscope.")]
    # __main__ runs the command line when imported
    return ["rnnscope"] + [n for n in names if not n.endswith("__main__")]


def _docstring_tests(name: str) -> list:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs the optional {e.name}")
        raise
    # the examples may use torch, nn and rnnscope without importing them, as the docs read
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, extraglobs={"torch": torch, "nn": nn,
                                                      "rnnscope": rnnscope})
            if t.examples]


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for test in _docstring_tests(name):
        torch.manual_seed(0)
        runner = doctest.DocTestRunner(optionflags=flags)
        report: list[str] = []
        result = runner.run(test, out=report.append)
        assert result.failed == 0, f"{test.name}:\n" + "".join(report)


def test_docstring_examples_exist():
    # guards the discovery above: a broken finder would pass vacuously
    assert len(_docstring_tests("rnnscope.replay")) >= 1
    assert len(_docstring_tests("rnnscope.profile")) >= 2
