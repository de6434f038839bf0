"""Loggers never take training down; logs cut short or resumed still read."""

import csv
import errno
import json
import warnings

import pytest
import torch
from torch import nn

from rnnscope.monitor import CSVLogger, GradientMonitor, JSONLLogger, read_jsonl


class FullDisk:
    """A raw file whose disk holds `room` more bytes: a write past it is cut short, the next
    one fails with ENOSPC (what a full disk does to an unbuffered append)."""

    def __init__(self, real, room: int):
        self.real, self.room = real, room
        self.fails = 0

    def write(self, data):
        data = bytes(data)
        if self.room <= 0:
            self.fails += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.real.write(data[: self.room])
        self.room -= n
        return n

    @property
    def closed(self):
        return self.real.closed

    def close(self):
        self.real.close()


def _fill(logger, room):
    disk = FullDisk(logger._out._fh, room)
    logger._out._fh = disk
    return disk


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _steps(model, mon, steps):
    for s in steps:
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 1, generator=g)
        model.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        mon.step()  # must never raise an OSError into training


def test_a_full_disk_warns_once_pauses_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    model = Net()
    jl = JSONLLogger(tmp_path / "run.jsonl", retry_every=3)
    cl = CSVLogger(tmp_path / "run.csv", retry_every=3)
    with GradientMonitor(model, loggers=[jl, cl], replay_every=0) as mon:
        _steps(model, mon, range(2))  # two records written whole
        disks = [_fill(jl, 25), _fill(cl, 10)]  # the third is cut short, then ENOSPC
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _steps(model, mon, range(2, 7))
        paused = [w for w in seen if "logging to it is paused" in str(w.message)]
        assert len(paused) == 2, [str(w.message) for w in seen]  # one per logger, not per step
        assert all(issubclass(w.category, RuntimeWarning) for w in paused)
        assert "No space left on device" in str(paused[0].message)
        assert all(d.fails >= 1 for d in disks)
        for d in disks:
            d.room = 10 ** 9  # space freed: the next retry writes again
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _steps(model, mon, range(7, 12))
        resumed = [str(w.message) for w in seen if "is written again" in str(w.message)]
        assert len(resumed) == 2 and "record(s) were dropped" in resumed[0]
    with pytest.warns(RuntimeWarning, match=r"skipped 1 record\(s\) cut short .* line\(s\) 3"):
        steps, _ = read_jsonl(tmp_path / "run.jsonl")
    got = [r["step"] for r in steps]
    assert got[:2] == [0, 1] and got[-1] == 11 and got == sorted(got)
    assert len(mon.history) == 12  # the monitor itself lost nothing
    rows = list(csv.reader(open(tmp_path / "run.csv", newline="")))
    assert rows[0] == ["step", "name", "value"]
    # every row after the cut is a whole row: the cut-short one sits alone on its line
    whole = [r for r in rows[1:] if len(r) == 3 and r[0].isdigit()]
    assert {int(r[0]) for r in whole} >= {0, 1, 11}


def test_a_logger_with_a_write_error_never_raises(tmp_path):
    lg = JSONLLogger(tmp_path / "a.jsonl", retry_every=1)
    disk = _fill(lg, 0)
    with pytest.warns(RuntimeWarning, match="paused"):
        lg.log({"step": 0})
    for s in range(1, 4):  # retried at each record (retry_every=1), silently failing
        lg.log({"step": s})
    assert disk.fails == 4
    lg.close()
    assert (tmp_path / "a.jsonl").read_text() == ""


def test_a_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "run.jsonl"
    lg = JSONLLogger(path)
    for s in range(3):
        lg.log({"step": s, "layers": {}})
    lg.close()
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # only the newline lost: the record is whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_jsonl(path)[0]] == [0, 1, 2]
    for cut in (2, 5, 12, len(data.splitlines()[-1])):  # cut inside the last record
        path.write_bytes(data[: len(data) - cut])
        with pytest.warns(RuntimeWarning, match=r"skipped 1 record\(s\) cut short .* line\(s\) 3"):
            steps, _ = read_jsonl(path)
        assert [r["step"] for r in steps] == [0, 1]


def test_a_resumed_run_appends_on_a_fresh_line(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps({"type": "step", "step": 0}) + "\n" + '{"type": "step", "st')
    lg = JSONLLogger(path)
    lg.log({"step": 1})
    lg.log({"step": 2})
    lg.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"type": "step", "st' and json.loads(lines[2])["step"] == 1
    with pytest.warns(RuntimeWarning, match=r"line\(s\) 2"):
        steps, _ = read_jsonl(path)
    assert [r["step"] for r in steps] == [0, 1, 2]
    # a file that ends cleanly gets no extra blank line
    before = path.read_bytes()
    JSONLLogger(path).close()
    assert path.read_bytes() == before


def test_a_csv_log_resumed_after_a_cut_row_starts_a_fresh_row(tmp_path):
    path = tmp_path / "run.csv"
    path.write_text("step,name,value\r\n0,grad_norm/global,1.0\r\n1,grad_no")
    lg = CSVLogger(path)
    lg.log({"step": 2, "global_norm": 3.0})
    lg.close()
    rows = list(csv.reader(open(path, newline="")))
    assert rows[0] == ["step", "name", "value"]  # no second header
    assert rows[-1] == ["2", "grad_norm/global", "3.0"] and rows[-2] == ["1", "grad_no"]


def test_lines_that_are_not_records_are_refused_with_the_line(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"type": "step", "step": 0}\nhello\n{"type": "step", "step": 1}\n')
    with pytest.raises(ValueError, match=r"run.jsonl:2 is not a monitor log record"):
        read_jsonl(path)
    # only a prefix of a record counts as cut short; a damaged middle is refused
    path.write_text('{"type": "step", "step": 0}\n{"type": "step", "step": 1}}\n')
    with pytest.raises(ValueError, match=r"run.jsonl:2 is not a monitor log record"):
        read_jsonl(path)


def test_every_cut_of_a_record_reads_as_cut_short(tmp_path):
    record = {"step": 12, "global_norm": -1.25e-07, "flag": True, "none": None,
              "layers": {"enc.rnn": {"input_grad": [0.5, "nan", 3e+20, -0.0],
                                     "gates": {"l0d0": {"mean": 0.73, "frac_units_hi": 0}}}},
              "message": "vanishing: ‖∂L/∂x‖ at lag 5 is 1e-9"}
    path = tmp_path / "run.jsonl"
    lg = JSONLLogger(path)
    lg.log({"step": 0})
    lg.log(record)
    lg.close()
    data = path.read_bytes()
    last = data.splitlines(keepends=True)[-1]
    for keep in range(1, len(last) - 1):  # every cut inside the record (ASCII: any byte)
        path.write_bytes(data[: len(data) - len(last) + keep])
        with pytest.warns(RuntimeWarning, match="cut short"):
            steps, _ = read_jsonl(path)
        assert [r["step"] for r in steps] == [0], keep
