"""Monitor overhead (issue 10 item 6, "a monitor you never turn off"): monitored vs bare
training steps, timed side by side with `timing.compare_times` (torch.utils.benchmark Timer,
interleaved rounds), on two loops:

- the benchmark model: 2-layer nn.LSTM B=32 T=100 I=64 H=256 -> Linear, Adam;
- a char-level language model: Embedding -> 2-layer nn.LSTM (dropout 0.3) -> Linear,
  cross-entropy at every step, Adam, a small vocabulary drawn here (no downloads).

Each loop runs on two copies of one model (same weights, same batches): one bare, one with a
GradientMonitor attached for the whole run. The default settings are every=1 (cheap statistics
every step) and replay_every=100 (one exact replay per 100 steps); the replay step's extra cost
is measured on its own and amortised over 100 steps.

    PYTHONPATH=src python benchmarks/bench_monitor.py     # 1 and 2 threads, with `uptime`
    ... bench_monitor.py --cpu-time --one-thread         # process CPU time (a busy machine)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import compare_times  # noqa: E402

from rnnscope.monitor import AlertPolicy, GradientMonitor  # noqa: E402

REPLAY_EVERY = 100  # the default preset's replay_every


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(64, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class CharLM(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear, the char-RNN tutorials' shape."""

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, 2, batch_first=True, dropout=0.3)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.fc(self.lstm(self.embed(x))[0])  # (B, T, V)


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 100, 64, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(n)]


def _char_batches(n, vocab: int = 48, B: int = 32, T: int = 50):
    """(B, T) next-token batches cut from one random token stream (a Markov-ish text stand-in
    made here, so nothing is downloaded)."""
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, vocab, (20_000,), generator=g)
    out = []
    for _ in range(n):
        ix = torch.randint(0, len(stream) - T - 1, (B,), generator=g)
        x = torch.stack([stream[i:i + T] for i in ix])
        y = torch.stack([stream[i + 1:i + T + 1] for i in ix])
        out.append((x, y))
    return out


def _loop(model, batches, loss_fn, mon=None):
    """One zero-arg callable: a training step on each batch (monitor.step() after backward)."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def steps():
        for x, y in batches:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step()
            opt.step()

    return steps


def _ce_last(logits, y):
    return nn.functional.cross_entropy(logits, y)


def _ce_per_step(logits, y):  # (B, T, V) logits, (B, T) targets: a loss at every step
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def cpu_times(candidates: dict, *, rounds: int) -> dict:
    """As `timing.compare_times` (Timer, interleaved rounds, median), but timing the process's
    CPU time (time.process_time) instead of the wall clock: on a machine shared with other
    jobs the waits for a core are not counted. Meaningful at one thread."""
    timers = {name: benchmark.Timer("fn()", globals={"fn": fn}, timer=time.process_time,
                                    num_threads=torch.get_num_threads())
              for name, fn in candidates.items()}
    for fn in candidates.values():
        fn()
    measured = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, timer in timers.items():
            measured[name].append(timer.timeit(1).median)
    return {name: statistics.median(ts) for name, ts in measured.items()}


def measure(make_model, batches, loss_fn, rounds: int, cpu: bool = False) -> dict:
    """Per-step seconds of: bare, cheap statistics every step (no replay), a step with the
    exact replay (every=1, replay_every=1), and the default settings amortised. cpu=True:
    process CPU time (`cpu_times`) instead of wall time (`compare_times`)."""
    torch.manual_seed(0)
    bare_m, cheap_m, full_m = make_model(), make_model(), make_model()
    cheap_m.load_state_dict(bare_m.state_dict())
    full_m.load_state_dict(bare_m.state_dict())
    quiet = AlertPolicy(warn=False)
    cheap = GradientMonitor(cheap_m, replay_every=0, alerts=quiet).attach()
    full = GradientMonitor(full_m, every=1, replay_every=1, alerts=quiet).attach()
    candidates = {"bare": _loop(bare_m, batches, loss_fn),
                  "cheap": _loop(cheap_m, batches, loss_fn, cheap),
                  "replay": _loop(full_m, batches, loss_fn, full)}
    t = (cpu_times(candidates, rounds=rounds) if cpu
         else compare_times(candidates, rounds=rounds))
    cheap.close()
    full.close()
    t = {k: v / len(batches) for k, v in t.items()}
    # default: cheap statistics every step, plus one replay step's extra cost per 100 steps
    t["default"] = t["cheap"] + (t["replay"] - t["cheap"]) / REPLAY_EVERY
    return t


def _print(title: str, t: dict, target: str) -> None:
    bare = t["bare"]
    print(f"\n{title}")
    print(f"  bare training step                          {bare * 1e3:8.2f} ms   1.000x")
    print(f"  monitored, cheap statistics every step      {t['cheap'] * 1e3:8.2f} ms   "
          f"{t['cheap'] / bare:.3f}x")
    print(f"  a replay step (every=1, replay_every=1)     {t['replay'] * 1e3:8.2f} ms   "
          f"{t['replay'] / bare:.3f}x")
    print(f"  default settings (every=1, replay_every={REPLAY_EVERY}), amortised: "
          f"{t['default'] / bare:.3f}x (target {target})")


def run(quick: bool = False, cpu: bool = False):
    rounds = 3 if quick else 7
    clock = "process CPU time" if cpu else "wall time"
    print(f"\n(g) GradientMonitor overhead, CPU, {torch.get_num_threads()} thread(s), {clock}")
    t_lstm = measure(Model, _batches(2 if quick else 4), _ce_last, rounds, cpu)
    _print("  2-layer LSTM B=32 T=100 I=64 H=256, loss at the last step, Adam", t_lstm, "≤ 1.05")
    t_char = measure(lambda: CharLM(48), _char_batches(10 if quick else 30), _ce_per_step,
                     rounds, cpu)
    _print("  char LM: Embedding(48, 32) -> 2-layer LSTM H=64 (dropout 0.3) -> Linear, "
           "B=32 T=50, loss at every step, Adam", t_char, "≤ 1.05")
    return [{"title": "monitor (2-layer LSTM), default settings vs bare", "times": t_lstm,
             "baseline": "bare", "target": "default ≤ 1.05", "goal": ("default", "<=", 1.05)},
            {"title": "monitor (char LM), default settings vs bare", "times": t_char,
             "baseline": "bare", "target": "default ≤ 1.05", "goal": ("default", "<=", 1.05)}]


if __name__ == "__main__":
    quick, cpu = "--quick" in sys.argv, "--cpu-time" in sys.argv
    for threads in (1,) if "--one-thread" in sys.argv else (1, 2):
        torch.set_num_threads(threads)
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        run(quick=quick, cpu=cpu)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
