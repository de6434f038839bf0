"""The memory estimate of `compare` on the modern recurrences: a request too large for the
machine is refused before any work, with the estimate in the one-line message. (That sLSTM's
dense step Jacobians are built a chunk at a time, as the estimate assumes, is tested in
test_modern_slstm_chunks.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from rnnscope.budget import compare_bytes, format_bytes, modern_bytes
from rnnscope.models import MODERN_KINDS
from rnnscope.studies import compare_study, jacobian_samples_for


@pytest.mark.parametrize("kind", MODERN_KINDS)
def test_a_too_long_modern_comparison_is_refused_before_any_work(kind):
    t0 = time.perf_counter()
    with pytest.raises(MemoryError, match="needs an estimated") as e:
        compare_study(models=(kind,), seq_len=10 ** 8)
    assert time.perf_counter() - t0 < 5  # T = 10⁸ steps of any real work would take hours
    est = compare_bytes((kind,), seq_len=10 ** 8, hidden_size=128, input_size=64, samples=50,
                        num_layers=1,
                        jac_samples=jacobian_samples_for("auto", 10 ** 8, 50))  # the default
    msg = str(e.value)
    assert format_bytes(est) in msg and "T=100000000" in msg and "--seq-len" in msg
    assert "\n" not in msg


def test_the_estimate_is_in_the_refusal_under_a_memory_limit(monkeypatch):
    monkeypatch.setenv("RNNSCOPE_MEMORY_LIMIT", "1G")
    kw = dict(seq_len=200_000, hidden_size=64, input_size=8, samples=8, num_layers=1,
              jac_samples=2)
    est = compare_bytes(("lru",), **kw)
    assert est > 2 ** 30  # the case is over the limit by the formula itself
    with pytest.raises(MemoryError, match=f"needs an estimated {format_bytes(est)}"):
        compare_study(models=("lru",), **{k: v for k, v in kw.items()
                                         if k != "jac_samples"}, jac_samples=2)
    small = dict(kw, seq_len=50)
    assert compare_bytes(("lru",), **small) < 2 ** 30


def test_the_cli_refuses_in_one_line():
    p = subprocess.run([sys.executable, "-m", "rnnscope", "compare", "--models", "lru",
                        "--seq-len", str(10 ** 8), "--no-report"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "needs an estimated" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0


def test_modern_estimates_grow_linearly_in_time():
    for kind in MODERN_KINDS:
        a = sum(modern_bytes(kind, input_size=8, hidden_size=32, samples=4, seq_len=10_000,
                             jac_samples=2))
        b = sum(modern_bytes(kind, input_size=8, hidden_size=32, samples=4, seq_len=20_000,
                             jac_samples=2))
        assert 1.9 < b / a <= 2.0, kind

