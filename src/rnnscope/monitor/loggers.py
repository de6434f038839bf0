"""Where the monitor's records go: JSON Lines (built in), CSV, TensorBoard (extra).

A logger has `log(record)` for one step's `Record`, `log_alert(alert)` and `close()`. The JSON
Lines file holds each record's `to_dict()` (non-finite numbers written as "nan"/"inf", never
dropped); `Record.from_dict` reads it back, also logs written by older versions.

Logging never takes training down. The file loggers append whole lines with one write each;
when a write fails (a full disk, a vanished network mount), one RuntimeWarning says so and the
logger pauses: it drops records, retries every `retry_every` records, and on success says how
many it dropped. A line cut short by a crash or a failed write is closed with a newline before
anything else is appended, so a resumed run's records start on a fresh line; `read_jsonl` skips
such a cut-short record with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path

class Logger:
    def log(self, record: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def log_alert(self, alert) -> None:
        pass

    def close(self) -> None:
        pass


class _LineAppender:
    """Appends whole lines to a file; a failed write warns once and pauses instead of raising.

    The file is opened unbuffered in binary append mode, so each line is one write() that
    either reaches the file or fails here (nothing is left in a buffer to fail again later).
    """

    def __init__(self, path: Path, what: str, retry_every: int):
        self.path, self.what, self.retry_every = path, what, retry_every
        self._fh = open(path, "ab", buffering=0)
        # a last line cut short (a crash mid-write) is closed first: new records start fresh
        self._open_line = self._ends_mid_line()
        self._paused_at = None  # records dropped since the pause, or None when writing
        self._dropped = 0

    def _ends_mid_line(self) -> bool:
        size = os.path.getsize(self.path)
        if size == 0:
            return False
        with open(self.path, "rb") as fh:
            fh.seek(size - 1)
            return fh.read(1) != b"\n"

    def append(self, text: str) -> None:
        """Append `text` (whole lines, each ending in a newline)."""
        if self._fh.closed:
            return
        if self._paused_at is not None:
            self._dropped += 1
            if self._dropped % self.retry_every:
                return
        data = (b"\n" if self._open_line else b"") + text.encode("utf-8")
        try:
            view = memoryview(data)
            while view:  # a raw write may be short
                n = self._fh.write(view)
                view = view[n:]
                self._open_line = bool(len(view))
        except OSError as e:
            self._open_line = True  # part of the line may be in the file
            if self._paused_at is None:
                self._paused_at, self._dropped = 0, 0
                warnings.warn(f"rnnscope: writing the {self.what} {self.path} failed "
                              f"({type(e).__name__}: {e.strerror or e}); logging to it is "
                              f"paused, training continues. It retries every "
                              f"{self.retry_every} records.", RuntimeWarning, stacklevel=4)
            return
        if self._paused_at is not None:
            warnings.warn(f"rnnscope: the {self.what} {self.path} is written again; "
                          f"{self._dropped} record(s) were dropped while writing failed",
                          RuntimeWarning, stacklevel=4)
            self._paused_at, self._dropped = None, 0

    def close(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError:  # nothing is buffered; a close error loses nothing more
                pass


class JSONLLogger(Logger):
    """One JSON object per line: {"type": "step", ...record} or {"type": "alert", ...}.

    Appends to an existing file (a resumed run continues its log): a last line cut short by a
    crash is closed first, so the new records start on a fresh line. Every line is written at
    once, so a crash loses at most the line being written. A failed write warns once and
    pauses logging (retried every `retry_every` records); it never raises into training.
    """

    def __init__(self, path, *, retry_every: int = 100):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = _LineAppender(self.path, "monitor log", retry_every)
        self._warned_unserialisable = False

    def _write(self, obj: dict) -> None:
        try:
            line = json.dumps(obj, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:  # a record that is not JSON-safe: a bug, kept
            if not self._warned_unserialisable:  # out of the training loop's way
                self._warned_unserialisable = True
                warnings.warn(f"rnnscope: a record could not be written to {self.path} as "
                              f"JSON ({e}); such records are skipped", RuntimeWarning,
                              stacklevel=3)
            return
        self._out.append(line)

    def log(self, record) -> None:
        self._write({"type": "step", **_as_json(record)})

    def log_alert(self, alert) -> None:
        self._write({"type": "alert", **alert.to_dict()})

    def close(self) -> None:
        self._out.close()


def flat_scalars(record) -> dict:
    """{name: float} of the scalar figures of a `Record` (for CSV, TensorBoard, Lightning)."""
    from .statistics import flat_scalars as scalars

    return scalars(_as_record(record))


def _as_record(record):
    """A `Record`; a JSON-form dict (an older caller, a read log) is decoded first."""
    from .record import Record

    return record if isinstance(record, Record) else Record.from_dict(record)


def _as_json(record) -> dict:
    """The JSON form of a record; a dict is written as it is."""
    return record.to_dict() if hasattr(record, "to_dict") else record


class CSVLogger(Logger):
    """Long-format CSV: step, name, value — one row per scalar figure.

    Appends like JSONLLogger (header only in a new file) and, like it, never raises a write
    failure into training: it warns once and pauses.
    """

    def __init__(self, path, *, retry_every: int = 100):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or os.path.getsize(self.path) == 0
        self._out = _LineAppender(self.path, "monitor CSV log", retry_every)
        if new:
            self._out.append(self._rows([["step", "name", "value"]]))

    @staticmethod
    def _rows(rows) -> str:
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        return buf.getvalue()

    def log(self, record) -> None:
        record = _as_record(record)
        self._out.append(self._rows([record.step, name, repr(v)]
                                    for name, v in flat_scalars(record).items()))

    def log_alert(self, alert) -> None:
        self._out.append(self._rows([[alert.step, f"alert/{alert.kind}/{alert.layer}",
                                      repr(alert.value)]]))

    def close(self) -> None:
        self._out.close()


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
        if os.path.exists(log_dir) and not os.path.isdir(log_dir):
            raise ValueError(f"TensorBoardLogger: log_dir {str(log_dir)!r} is an existing file; "
                             "give a folder (SummaryWriter adds an event file to it)")
        self.writer = SummaryWriter(str(log_dir))
        self.image_every = image_every
        self._history = []
        self._n = 0

    def log(self, record) -> None:
        record = _as_record(record)
        for name, v in flat_scalars(record).items():
            self.writer.add_scalar(name, v, record.step)
        self._history.append(record)
        self._history = self._history[-500:]  # bounded
        self._n += 1
        if self.image_every and self._n % self.image_every == 0:
            self._heatmaps(record.step)

    def _heatmaps(self, step: int) -> None:
        from .. import plotting

        for layer in self._history[-1].layers:
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
        if p.suffix.lower() == ".csv":
            return [CSVLogger(p)]
        if p.suffix.lower() == ".jsonl":
            return [JSONLLogger(p)]
        if p.exists() and not p.is_dir():
            raise ValueError(f"logger path {str(spec)!r} is an existing file, and a path that "
                             "does not end in .jsonl or .csv is taken as a folder for "
                             "rnnscope-monitor.jsonl; give a .jsonl or .csv file or a folder")
        return [JSONLLogger(p / "rnnscope-monitor.jsonl")]
    raise TypeError(f"a logger is a Logger, a directory, a .jsonl or .csv path; got "
                    f"{type(spec).__name__}")


_RECORD_START = '{"type": '  # how every line JSONLLogger writes begins


def read_jsonl(path) -> tuple[list[dict], list[dict]]:
    """(step records, alerts) from a monitor JSON Lines file.

    A record cut short (a run killed mid-write, or a failed write on a full disk; a resumed run
    then continued on the next line) is skipped with one RuntimeWarning naming its line. Any
    other line that is not a JSON object is refused, naming the line.

    Raises:
        ValueError: a line is neither a record nor a cut-short record.
    """
    steps, alerts, cut = [], [], []
    with open(path, encoding="utf-8", errors="replace", newline="\n") as fh:
        for n, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                if _cut_short(text, e):
                    cut.append(n)
                    continue
                raise ValueError(f"{path}:{n} is not a monitor log record (invalid JSON: "
                                 f"{e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n} is not a monitor log record (a JSON "
                                 f"{type(obj).__name__}, expected an object)")
            (alerts if obj.get("type") == "alert" else steps).append(obj)
    if cut:
        shown = ", ".join(map(str, cut[:5])) + (f" and {len(cut) - 5} more" if len(cut) > 5
                                                else "")
        warnings.warn(f"{path}: skipped {len(cut)} record(s) cut short (a run stopped "
                      f"mid-write) at line(s) {shown}", RuntimeWarning, stacklevel=2)
    return steps, alerts


def _cut_short(text: str, e: json.JSONDecodeError) -> bool:
    """Whether an unparsable line is the beginning of a record whose end was never written.

    Such a line begins like every record and fails only where its text runs out: inside a
    string that never closes, or within the last few characters (a cut number or literal).
    Extra or damaged text in the middle of a line is not a cut record.
    """
    if not (_RECORD_START.startswith(text) or text.startswith(_RECORD_START)):
        return False
    return e.msg.startswith("Unterminated string") or (e.msg != "Extra data"
                                                        and e.pos >= len(text) - 5)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    if isinstance(v, str):
        return v in ("nan", "inf", "-inf")
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_plot_records(steps: list, alerts: list, path) -> tuple[list[dict], list[dict]]:
    """Step records and alerts as `rnnscope plot-log` draws them, checked and in step order.

    Checks what the plots read (a record's integer "step", its "layers" object and each
    layer's "input_grad" list of numbers; an alert's "kind" text and integer "step"), naming
    the first wrong entry. A step logged twice (a run resumed from an earlier checkpoint) is
    drawn from its last record, with a warning.

    Raises:
        ValueError: no step records, or an entry of the wrong type.
    """
    if not steps:
        raise ValueError(f"{path} holds no step records")
    for i, r in enumerate(steps):
        where = f"{path}: step record {i + 1}"
        if not _is_int(r.get("step")):
            raise ValueError(f"{where} has no integer 'step' (got {r.get('step')!r:.40})")
        layers = r.get("layers", {})
        if not isinstance(layers, dict):
            raise ValueError(f"{where} (step {r['step']}): 'layers' must be an object")
        for name, rec in layers.items():
            if not isinstance(rec, dict):
                raise ValueError(f"{where} (step {r['step']}): layer {name!r:.60} must be an "
                                 f"object")
            for key in ("input_grad", "output_lag_grad"):
                prof = rec.get(key)
                if prof is not None and not (isinstance(prof, list)
                                             and all(_is_number(v) for v in prof)):
                    raise ValueError(f"{where} (step {r['step']}): layer {name!r:.60}'s "
                                     f"'{key}' must be a list of numbers")
    for i, a in enumerate(alerts):
        if not (isinstance(a.get("kind"), str) and _is_int(a.get("step"))):
            raise ValueError(f"{path}: alert {i + 1} needs a text 'kind' and an integer "
                             f"'step'")
    from .record import Record

    for i, r in enumerate(steps):  # every field decodes (what plot-log draws reads them typed)
        try:
            Record.from_dict(r)
        except ValueError as e:
            raise ValueError(f"{path}: step record {i + 1}: {e}") from None
    last = {r["step"]: r for r in steps}  # the later record of a step wins
    if len(last) < len(steps):
        warnings.warn(f"{path}: {len(steps) - len(last)} step record(s) were logged again "
                      f"(a resumed run); the last record of each step is drawn",
                      RuntimeWarning, stacklevel=2)
    ordered = [last[s] for s in sorted(last)]
    return ordered, sorted(alerts, key=lambda a: a["step"])
