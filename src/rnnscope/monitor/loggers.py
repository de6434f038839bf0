"""Where the monitor's records go: JSON Lines (built in), CSV, TensorBoard (extra).

A logger has `log(record)` for one step's record, `log_alert(alert)` and `close()`. Records are
JSON-safe dicts (see GradientMonitor); non-finite numbers are written as "nan"/"inf", never
dropped.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path


class Logger:
    def log(self, record: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def log_alert(self, alert) -> None:
        pass

    def close(self) -> None:
        pass


class JSONLLogger(Logger):
    """One JSON object per line: {"type": "step", ...record} or {"type": "alert", ...}.

    Appends to an existing file (a resumed run continues its log); the file is flushed after
    every line so that a crash loses nothing.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def _write(self, obj: dict) -> None:
        self._fh.write(json.dumps(obj, allow_nan=False) + "\n")
        self._fh.flush()

    def log(self, record: dict) -> None:
        self._write({"type": "step", **record})

    def log_alert(self, alert) -> None:
        self._write({"type": "alert", **alert.to_dict()})

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def flat_scalars(record: dict) -> dict:
    """{name: float} of the scalar figures of a record (for CSV, TensorBoard, Lightning)."""
    from ..results import json_number

    out = {}
    if record.get("global_norm") is not None:
        out["grad_norm/global"] = float(json_number(record["global_norm"]))
    for layer, rec in record.get("layers", {}).items():
        prof = rec.get("input_grad")
        if prof:
            out[f"{layer}/input_grad/lag0"] = float(json_number(prof[-1]))
            out[f"{layer}/input_grad/first_step"] = float(json_number(prof[0]))
        for name, v in rec.get("param_norms", {}).items():
            out[f"{layer}/grad_norm/{name}"] = float(json_number(v))
        for key, g in rec.get("gates", {}).items():
            out[f"{layer}/{key}/gate_mean"] = float(json_number(g["mean"]))
            out[f"{layer}/{key}/frac_units_hi"] = float(json_number(g["frac_units_hi"]))
        for key, sg in rec.get("state_grad", {}).items():
            out[f"{layer}/{key}/dL_dh_first_step"] = float(json_number(sg["h"][0]))
    for name, n in record.get("nonfinite_params", {}).items():
        out[f"nonfinite/{name}"] = float(n)
    return out


class CSVLogger(Logger):
    """Long-format CSV: step, name, value — one row per scalar figure."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or os.path.getsize(self.path) == 0
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._w = csv.writer(self._fh)
        if new:
            self._w.writerow(["step", "name", "value"])

    def log(self, record: dict) -> None:
        for name, v in flat_scalars(record).items():
            self._w.writerow([record["step"], name, repr(v)])
        self._fh.flush()

    def log_alert(self, alert) -> None:
        self._w.writerow([alert.step, f"alert/{alert.kind}/{alert.layer}", repr(alert.value)])
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class TensorBoardLogger(Logger):
    """SummaryWriter scalars, plus a per-lag heatmap image every `image_every` records.

    Needs the extra: pip install 'rnnscope[tensorboard]'.
    """

    def __init__(self, log_dir, *, image_every: int = 50):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoardLogger needs tensorboard: pip install "
                              "'rnnscope[tensorboard]'") from e
        self.writer = SummaryWriter(str(log_dir))
        self.image_every = image_every
        self._history = []
        self._n = 0

    def log(self, record: dict) -> None:
        for name, v in flat_scalars(record).items():
            self.writer.add_scalar(name, v, record["step"])
        self._history.append(record)
        self._history = self._history[-500:]  # bounded
        self._n += 1
        if self.image_every and self._n % self.image_every == 0:
            self._heatmaps(record["step"])

    def _heatmaps(self, step: int) -> None:
        from .. import plotting

        for layer in self._history[-1].get("layers", {}):
            fig = plotting.plot_lag_heatmap(self._history, layer)
            if fig is not None:
                self.writer.add_figure(f"{layer}/input_grad_heatmap", fig, step)

    def log_alert(self, alert) -> None:
        self.writer.add_text(f"alerts/{alert.kind}", alert.message, alert.step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_loggers(spec) -> list[Logger]:
    """Loggers from a spec: a Logger, a directory or *.jsonl path (JSON Lines), a *.csv path,
    or a list of those."""
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        return [lg for s in spec for lg in make_loggers(s)]
    if isinstance(spec, Logger):
        return [spec]
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if p.suffix == ".csv":
            return [CSVLogger(p)]
        if p.suffix == ".jsonl":
            return [JSONLLogger(p)]
        return [JSONLLogger(p / "rnnscope-monitor.jsonl")]
    raise TypeError(f"a logger is a Logger, a directory, a .jsonl or .csv path; got "
                    f"{type(spec).__name__}")


def read_jsonl(path) -> tuple[list[dict], list[dict]]:
    """(step records, alerts) from a monitor JSON Lines file."""
    steps, alerts = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            (alerts if obj.get("type") == "alert" else steps).append(obj)
    return steps, alerts
