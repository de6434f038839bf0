"""Package hygiene: one version string, typed marker, licence, numpy only where it is drawn."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rnnscope

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "rnnscope"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_string():
    meta = _pyproject()
    # the version is declared nowhere but rnnscope.__version__
    assert "version" not in meta["project"]
    assert "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rnnscope.__version__"}
    assert isinstance(rnnscope.__version__, str) and rnnscope.__version__.count(".") >= 2
    # studies record the same string in results.json
    from rnnscope.studies import versions
    assert versions()["rnnscope"] == rnnscope.__version__


def test_typed_marker_and_licence_are_shipped():
    meta = _pyproject()
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["rnnscope"]
    licence = (ROOT / "LICENSE").read_text()
    assert meta["project"]["license"] == {"text": "MIT"}
    assert licence.startswith("MIT License")


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions) by one source file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_numpy_is_imported_only_where_figures_are_drawn():
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "numpy" in _top_level_imports(p)}
    assert importers <= {"plotting.py"}, importers
    meta = _pyproject()
    assert not any(d.startswith("numpy") for d in meta["project"]["dependencies"])
    assert any(d.startswith("numpy") for d in meta["project"]["optional-dependencies"]["plot"])


def test_measurements_work_without_numpy():
    # numpy made unimportable: torch warns and carries on; rnnscope's measurements and result
    # dictionaries must not need it
    code = ("import sys, warnings; sys.modules['numpy'] = None; warnings.simplefilter('ignore')\n"
            "import json, torch, rnnscope\n"
            "p = rnnscope.gradient_profile(torch.nn.LSTM(3, 4, batch_first=True), seq_len=5,"
            " samples=2)\n"
            "json.dumps(p.to_dict(), allow_nan=False)\n"
            "print(p.per_sample.shape)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "torch.Size([2, 5])"
