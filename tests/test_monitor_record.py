"""Monitor records as typed objects: statistics declared as classes, the JSON Lines codec, logs
written by the earlier dict-record monitor, and adding a statistic in one place."""

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from rnnscope import cli, plotting
from rnnscope.monitor import GradientMonitor, LayerRecord, Record, read_jsonl
from rnnscope.monitor import statistics
from rnnscope.monitor.loggers import flat_scalars

OLD_LOG = Path(__file__).parent / "data" / "monitor_log_main_format.jsonl"


def _walk(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def _typed_values(rec: Record):
    for v in list(rec.values.values()) + [lv for lay in rec.layers.values()
                                          for lv in lay.values.values()]:
        if hasattr(v, "__dataclass_fields__"):
            yield from _walk({f: getattr(v, f) for f in v.__dataclass_fields__})
        elif isinstance(v, dict):
            for k, x in v.items():
                yield k
                yield from (_walk(x.__dict__) if hasattr(x, "__dataclass_fields__")
                            else _walk(x))
        else:
            yield v


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def _run(steps=3, nan_at=None, **kw):
    torch.manual_seed(0)
    model = Net()
    with GradientMonitor(model, replay_every=1, **kw) as mon:
        for s in range(steps):
            x, y = torch.randn(3, 9, 4), torch.randint(0, 3, (3, 9))
            loss = nn.functional.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))
            if s == nan_at:
                loss = loss * float("nan")
            loss.backward()
            mon.step()
            model.zero_grad()
    return list(mon.history)


def test_a_record_is_typed_no_nan_strings_no_structure_in_string_keys():
    with pytest.warns(Warning):
        recs = _run(nan_at=1)
    rec = recs[1]
    assert isinstance(rec, Record) and isinstance(rec.layers["lstm"], LayerRecord)
    assert isinstance(rec.global_norm, float) and math.isnan(rec.global_norm)
    lay = rec.layers["lstm"]
    assert set(lay.state_grad) == {(0, 0), (1, 0)}  # (layer, direction), not "l0d0"
    assert set(lay.gates) == {(0, 0), (1, 0)} and lay.gates[(1, 0)].gate == "f"
    assert lay.param_norms["weight_hh_l1"].keys() == {"i", "f", "g", "o"}
    for v in _typed_values(rec):
        assert not isinstance(v, str) or v not in ("nan", "inf", "-inf")
        assert not (isinstance(v, str) and "/" in v)
    # the JSON form alone carries the "nan" text, and reads back to an equal record
    d = recs[0].to_dict()
    assert Record.from_dict(json.loads(json.dumps(d))) == recs[0]
    assert recs[1].to_dict()["global_norm"] == "nan"
    with pytest.raises(AttributeError, match="no statistic 'input_gradd'"):
        lay.input_gradd  # noqa: B018
    assert pickle.loads(pickle.dumps(recs[0])) == recs[0]


def test_a_log_written_by_the_earlier_dict_record_monitor_still_loads_and_plots(tmp_path):
    """tests/data/monitor_log_main_format.jsonl was written by the monitor before records were
    typed (LSTM → bidirectional GRU, per-step and last-step losses, a NaN step, alerts)."""
    steps, alerts = read_jsonl(OLD_LOG)
    assert len(steps) == 4 and alerts
    for d in steps:
        body = {k: v for k, v in d.items() if k != "type"}
        rec = Record.from_dict(body)
        assert rec.to_dict() == body  # the same format, key for key
    rec = Record.from_dict(steps[0])
    assert rec.layers["gru"].state_grad[(0, 1)].c is None
    assert math.isnan(Record.from_dict(steps[3]).global_norm)
    assert rec.layers["lstm"].input_grad.mean[0] == steps[0]["layers"]["lstm"]["input_grad"][0]
    which, rows = plotting.lag_heatmap_rows(steps, "lstm")
    assert which == "input" and len(rows) == 4
    assert cli.main(["plot-log", str(OLD_LOG), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"heatmap_lstm.png",
                                                              "heatmap_gru.png", "alerts.png"}


def test_the_record_from_the_monitor_round_trips_through_the_jsonl_logger(tmp_path):
    log = tmp_path / "m.jsonl"
    recs = _run(loggers=log)
    steps, _ = read_jsonl(log)
    assert [Record.from_dict(s) for s in steps] == recs
    assert steps[0]["layers"]["lstm"]["output_lag_grad"]  # per-step loss: the lag row
    assert flat_scalars(recs[0]) == flat_scalars(steps[0])  # a JSON dict is decoded first


class SaturatedForget(statistics.Statistic):
    """A statistic added by a user: per layer, the fraction of forget-gate values above 0.9
    over the replayed steps (exact), summed over ranks."""

    name, scope, schedule = "forget_above_09", "layer", "exact"
    states = {"above": "sum", "count": "sum"}

    def update(self, ctx, add):
        for (layer, d), p in ctx.state_parts().items():
            g = p["gate"][p["valid"]]
            add("above", float((g > 0.9).sum()), layer, d)
            add("count", float(g.numel()), layer, d)

    def compute(self, states, ctx):
        return {(l, d): float(v / states[("count", l, d)])
                for (s, l, d), v in states.items() if s == "above"}

    def to_json(self, value):
        return {self.name: {f"l{l}d{d}": v for (l, d), v in value.items()}}

    def from_json(self, d):
        v = d.get(self.name)
        return None if v is None else {(int(k[1]), int(k[3])): x for k, x in v.items()}

    def scalars(self, value):
        return {f"l{l}d{d}/forget_above_09": v for (l, d), v in value.items()}


def test_a_statistic_is_added_in_one_place(monkeypatch, tmp_path):
    monkeypatch.setattr(statistics, "STATISTICS", statistics.STATISTICS + (SaturatedForget(),))
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.lstm.bias_ih_l1[6:12] = 4.0  # layer 1's forget gates mostly above 0.9
    log = tmp_path / "m.jsonl"
    with GradientMonitor(model, replay_every=1, loggers=log) as mon:
        x = torch.randn(3, 9, 4)
        model(x).sum().backward()
        rec = mon.step()
    got = rec.layers["lstm"].forget_above_09
    import rnnscope

    f = [rnnscope.replay(model.lstm, x[:8]).layers[layer][0].gates["f"] for layer in (0, 1)]
    for layer in (0, 1):
        assert got[(layer, 0)] == pytest.approx(float((f[layer] > 0.9).double().mean()))
    assert got[(1, 0)] > 0.5 > got[(0, 0)]
    steps, _ = read_jsonl(log)
    assert Record.from_dict(steps[0]).layers["lstm"].forget_above_09 == got
    assert "lstm/l1d0/forget_above_09" in flat_scalars(rec)
