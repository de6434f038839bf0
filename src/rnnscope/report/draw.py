"""Draw a report's figures to PNG and SVG bytes, shared between this process and one helper.

Drawing is most of a report's time (`compare --seq-len 1000`: 4.6 s of 21 s), and nearly all
of it is matplotlib's Python (text layout, path drawing, the two file formats), which holds the
GIL: threads cannot share it out, processes can. On Linux with two or more CPUs, one helper
process forked after the results exist draws part of the figures while this process draws the
rest, with no import, pickle of the results or start-up cost (the fork shares everything read).

The helper cannot change what the report holds:
- it sends back only bytes of the figures it drew; a figure it failed on, did not send, or
  could not send in time is drawn here again, so an error surfaces from this process with the
  same message as without the helper;
- PNG bytes are the same from either process (Agg is deterministic); the SVGs differ only in
  matplotlib's random element ids, as between any two runs.

Not on other systems (macOS and Windows start processes by spawning, which re-imports torch:
seconds), on one CPU, with fewer than two makers, under a GUI matplotlib backend (its windows
and connections are the parent's), or when `RNNSCOPE_DRAW_HELPER=0`.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence

# Seconds each maker took at `compare --seq-len 1000` (figure, PNG and SVG; a process's first
# figure also loads fonts and the mathtext parser, ~0.5 s), for the split: unlisted count 1.
COST = {"highway": 1.9, "gradient_flow": 1.4, "gates": 0.9, "step_paths": 0.5,
        "decay": 0.35, "lag": 0.5}
FIRST_COST = 0.5  # seconds of `first` (results.json and the page's dry run) at T=1000
HELPER_WAIT = 60.0  # seconds after this process's own share before the helper is given up

Drawn = dict  # figure name -> (png bytes, svg bytes), in the order the maker returned them
Maker = Callable[[object], dict]


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def svg_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def helper_available(n_makers: int) -> bool:
    """Whether a forked helper can share `n_makers` makers' drawing (see the module doc)."""
    if os.environ.get("RNNSCOPE_DRAW_HELPER", "1") == "0" or n_makers < 2:
        return False
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    return len(os.sched_getaffinity(0)) >= 2 and _non_interactive_backend()


# matplotlib's file-only backends (matplotlib.rcsetup.non_interactive_bk before 3.9)
FILE_BACKENDS = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def _non_interactive_backend() -> bool:
    """Whether matplotlib draws to files only here (Agg when headless, as in the CLI): a GUI
    backend (Tk, Qt, a notebook's) holds windows and connections a forked child must not
    touch, so with one the figures are all drawn in this process."""
    import matplotlib

    return matplotlib.get_backend().lower() in FILE_BACKENDS


def split(makers: Sequence[Maker], head_start: float = 0.0) -> tuple[list[int], list[int]]:
    """Indices of `makers` for (this process, the helper): longest first, each to the lighter
    share, by COST; this process starts with `head_start` seconds of other work."""
    shares: tuple[list[int], list[int]] = ([], [])
    load = [head_start, 0.0]
    for i in sorted(range(len(makers)), key=lambda i: -COST.get(makers[i].__name__, 1.0)):
        k = 0 if load[0] <= load[1] else 1
        shares[k].append(i)
        load[k] += COST.get(makers[i].__name__, 1.0)
    return sorted(shares[0]), sorted(shares[1])


def draw_all(makers: Sequence[Maker], results, draw_one: Callable[[Maker, object], Drawn], *,
             helper: bool | None = None, first: Callable[[], None] | None = None) -> list[Drawn]:
    """[draw_one(make, results) for make in makers], the helper drawing its share when
    `helper` (None: `helper_available`). `draw_one` raises on failure; it is called again
    here for every maker the helper did not return. `first()` (results.json, a check) runs
    here before any drawing, while the helper already draws; its error stops the helper."""
    if helper is None:
        helper = helper_available(len(makers))
    if not helper or len(makers) < 2:
        if first is not None:
            first()
        return [draw_one(make, results) for make in makers]
    mine, theirs = split(makers, FIRST_COST if first is not None else 0.0)
    child = _Helper.start([makers[i] for i in theirs], results, draw_one)
    out: list[Drawn | None] = [None] * len(makers)
    try:
        if first is not None:
            first()
        for i in mine:
            out[i] = draw_one(makers[i], results)
        got = child.collect(timeout=HELPER_WAIT) if child else {}
    finally:
        if child is not None:
            child.stop()
    for j, i in enumerate(theirs):
        drawn = got.get(j)
        out[i] = drawn if drawn is not None else draw_one(makers[i], results)
    return out  # type: ignore[return-value]


class _Helper:
    """One forked process drawing `makers` and sending {index: Drawn} back through a pipe."""

    def __init__(self, pid: int, conn):
        self.pid, self.conn = pid, conn

    @classmethod
    def start(cls, makers, results, draw_one) -> _Helper | None:
        from multiprocessing import Pipe

        import matplotlib.pyplot  # noqa: F401 - loaded (fonts and all) once, before the fork

        recv, send = Pipe(duplex=False)
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a multi-threaded process may deadlock the child:
            # the child here takes no lock another thread may hold (no torch parallel region,
            # no pool), and a stuck child is given up after HELPER_WAIT
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                pid = os.fork()
            except OSError:  # no memory or process slots: draw everything here
                recv.close()
                send.close()
                return None
        if pid == 0:  # the helper: never returns
            recv.close()
            _helper_main(send, makers, results, draw_one)
        send.close()
        return cls(pid, recv)

    def collect(self, timeout: float) -> dict:
        """{index: Drawn} of the makers the helper drew; {} if it failed, died or is late."""
        try:
            if not self.conn.poll(timeout):
                return {}
            got = self.conn.recv()
        except (EOFError, OSError):
            return {}
        return got if isinstance(got, dict) else {}

    def stop(self) -> None:
        """Close the pipe and reap the helper (killed if still running)."""
        self.conn.close()
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _helper_main(conn, makers, results, draw_one) -> None:
    code = 0
    try:
        import torch

        # one thread: the parent's OpenMP pool did not survive the fork, and the two processes
        # already share the CPUs
        torch.set_num_threads(1)
        out = {}
        for j, make in enumerate(makers):
            try:
                out[j] = draw_one(make, results)
            except BaseException:  # noqa: BLE001 - the parent redraws it and raises itself
                out[j] = None
        conn.send(out)
        conn.close()
    except BaseException:  # noqa: BLE001 - the parent draws whatever did not arrive
        code = 1
    finally:
        os._exit(code)  # no atexit handlers, no flush of the parent's buffers, no pytest
