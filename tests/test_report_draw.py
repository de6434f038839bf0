"""The report's figures drawn with a forked helper process (report/draw.py) are the figures
drawn in one process, and a helper that fails, dies or hangs changes nothing but the time."""

from __future__ import annotations

import os
import re
import sys
import time

import matplotlib
import pytest

from rnnscope.report import draw
from rnnscope.report.write import ResultsError, render_report
from rnnscope.studies import compare_study

matplotlib.use("Agg")

linux_fork = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the helper is forked on Linux only")


@pytest.fixture(scope="module")
def results():
    return compare_study(models=("rnn", "lstm", "gru"), seq_len=7, hidden_size=4,
                         input_size=3, samples=3, seed=1, jac_samples=2)


def _without_ids(svg: bytes) -> bytes:
    """matplotlib names SVG elements with random ids (uuid-salted), different on every call."""
    return re.sub(rb'(id|xlink:href|href|clip-path)="[^"]*"', b"",
                  re.sub(rb"url\(#[^)]*\)", b"", svg))


@linux_fork
def test_helper_draws_the_same_report(results):
    alone = render_report(results, helper=False)
    shared = render_report(results, helper=True)
    assert list(shared) == list(alone)  # same files, same order
    assert {k for k in alone if k.endswith(".png")} == {
        f"figures/{n}.png" for n in ("gradient_flow", "highway", "step_paths", "gates", "decay")}
    for rel in alone:
        if rel.endswith(".svg"):
            assert _without_ids(shared[rel]) == _without_ids(alone[rel]), rel
        else:  # PNG (Agg is deterministic), results.json, report.html with the PNGs embedded
            assert shared[rel] == alone[rel], rel


def _pid_maker(name):
    def make(_results):
        return {name: os.getpid()}
    make.__name__ = name
    return make


def _record_pid(make, results):
    return {name: (str(pid).encode(), b"") for name, pid in make(results).items()}


@pytest.fixture
def helper_pids(monkeypatch):
    """The pids of the helpers draw_all starts, in order (to check each was reaped)."""
    started = []
    real_start = draw._Helper.start

    def start(*a, **k):
        child = real_start(*a, **k)
        started.append(child.pid)
        return child

    monkeypatch.setattr(draw._Helper, "start", start)
    return started


@linux_fork
def test_the_helper_really_draws_its_share():
    makers = [_pid_maker(n) for n in ("highway", "gradient_flow", "gates", "decay")]
    mine, theirs = draw.split(makers)
    assert mine and theirs and sorted(mine + theirs) == [0, 1, 2, 3]
    out = draw.draw_all(makers, None, _record_pid, helper=True)
    assert [next(iter(d)) for d in out] == ["highway", "gradient_flow", "gates", "decay"]
    pids = [int(next(iter(d.values()))[0]) for d in out]
    assert {pids[i] for i in mine} == {os.getpid()}
    assert os.getpid() not in {pids[i] for i in theirs}
    serial = draw.draw_all(makers, None, _record_pid, helper=False)
    assert {int(next(iter(d.values()))[0]) for d in serial} == {os.getpid()}


@linux_fork
def test_a_maker_failing_in_the_helper_is_drawn_here(helper_pids):
    parent = os.getpid()

    def flaky(make, results):
        if os.getpid() != parent:
            raise RuntimeError("only in the helper")
        return _record_pid(make, results)

    makers = [_pid_maker(n) for n in ("highway", "gradient_flow", "gates")]
    out = draw.draw_all(makers, None, flaky, helper=True)
    assert [int(next(iter(d.values()))[0]) for d in out] == [parent] * 3
    with pytest.raises(ChildProcessError):  # reaped: no zombie left behind
        os.waitpid(helper_pids[0], os.WNOHANG)


@linux_fork
def test_a_hung_helper_is_killed_and_its_share_drawn_here(monkeypatch, helper_pids):
    parent = os.getpid()
    monkeypatch.setattr(draw, "HELPER_WAIT", 0.5)

    def hangs(make, results):
        if os.getpid() != parent:
            time.sleep(600)
        return _record_pid(make, results)

    makers = [_pid_maker(n) for n in ("highway", "gradient_flow")]
    t0 = time.monotonic()
    out = draw.draw_all(makers, None, hangs, helper=True)
    assert time.monotonic() - t0 < 30
    assert [int(next(iter(d.values()))[0]) for d in out] == [parent, parent]
    with pytest.raises(ChildProcessError):
        os.waitpid(helper_pids[0], os.WNOHANG)


@linux_fork
def test_an_error_drawing_a_file_is_the_same_with_the_helper(results, monkeypatch):
    from rnnscope.report import figures

    def broken(_results):
        raise KeyError("cell_jacobians")

    broken.__name__ = "highway"
    makers = (figures.gradient_flow, broken, figures.gates, figures.decay)
    monkeypatch.setattr(figures, "ALL", makers)
    errors = []
    for helper in (False, True):
        with pytest.raises(ResultsError) as e:
            render_report(results, source="saved/results.json", helper=helper)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "saved/results.json" in errors[0] and "'highway'" in errors[0]
    assert "missing key 'cell_jacobians'" in errors[0]


def test_the_helper_is_used_only_where_it_can_help(monkeypatch):
    monkeypatch.setenv("RNNSCOPE_DRAW_HELPER", "0")
    assert not draw.helper_available(5)
    monkeypatch.delenv("RNNSCOPE_DRAW_HELPER")
    assert not draw.helper_available(1)
    monkeypatch.setattr(draw.sys, "platform", "darwin")
    assert not draw.helper_available(5)
    monkeypatch.setattr(draw.sys, "platform", "linux")
    monkeypatch.setattr(draw.os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert not draw.helper_available(5)
    monkeypatch.setattr(draw.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert draw.helper_available(5)
    monkeypatch.setattr(matplotlib, "get_backend", lambda: "TkAgg")  # a GUI: all drawn here
    assert not draw.helper_available(5)


def test_inspect_legends_say_each_submodules_kind():
    """inspect names recurrent submodules by path: "rnn" of an LSTM is labelled "rnn (LSTM)"
    (it read like a vanilla RNN); a name that says its kind, and compare's names, stay."""
    import matplotlib.pyplot as plt
    import torch
    from torch import nn

    from rnnscope.report import figures
    from rnnscope.studies import inspect_study

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)
            self.gru_head = nn.GRU(4, 4, batch_first=True)

        def forward(self, x):
            return self.gru_head(self.rnn(x)[0])[0]

    res = inspect_study(Two().eval(), inputs=torch.randn(2, 6, 3), jac_samples=1)
    assert list(figures._labelled(res)) == ["rnn (LSTM)", "gru_head"]
    fig = figures.highway(res)["highway"]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    assert any(t.startswith("rnn (LSTM)") for t in labels), labels
