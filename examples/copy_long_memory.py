"""The copy task over a delay of T = 1000 steps: the LSTM against the LRU and minGRU.

Model shape: one recurrent layer (nn.LSTM, rnnscope.LRU or rnnscope.MinGRU, hidden size H) and
a linear read-out at every step (`rnnscope.experiments.SequenceModel`), trained with Adam and
gradient-norm clipping on the copy task: n_copy symbols from 8, T − 1 blanks, a marker, then
recall the symbols (sequence length T + 2·n_copy). Every variant sees the same seeded batches.

What to look at, per variant and seed:

* recall accuracy on held-out batches (the n_copy remembered symbols; chance 1/8) and the recall
  cross-entropy against the memoryless log 8 — the loss the model trains on is the task's
  usual mean over all T + 2·n_copy steps, most of which are blanks;
* gradient flow that explains it: with the loss of the recall steps only, the gradient norm
  ‖∂L_recall/∂x_t‖ reaching the symbol steps (t < n_copy, about T steps before the recall)
  divided by the one at the marker step (just before the recall), at initialisation and at the
  end — measured by `gradient_profile` on a float64 copy of the model so that products of
  ~1000 decays do not underflow float32 (0 means below even float64's range, ~1e-308);
* the memory times 1/(1 − gate) of the units (`gate_stats`: the LSTM's forget gate, the
  modern layers' decay |a_t|), median and largest, at initialisation and at the end;
* wall time of the training.

Training runs without the GradientMonitor (which `rnnscope experiment` attaches to LSTMs but not
to the modern layers), so the wall times compare the layers themselves. One torch thread per
process (`--threads`): on a shared machine more threads over-subscribe the cores and an LSTM
step at T = 1000 became ~40× slower in our measurement.

Run: python examples/copy_long_memory.py [--seeds 0,1] [--out copy_long_memory.json]
     python examples/copy_long_memory.py --quick      # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from rnnscope import gate_stats, gradient_profile
from rnnscope.experiments import VARIANT_HELP, build_variant
from rnnscope.tasks import CopyTask

VARIANTS = ("lstm", "lstm-chrono", "lru", "mingru")
FULL = dict(T=1000, steps=1000, batch_size=32, hidden_size=32, n_copy=5, lr=3e-3, clip=1.0,
            eval_every=100, eval_batches=4, probe_samples=16)
QUICK = dict(T=30, steps=8, batch_size=8, hidden_size=8, n_copy=3, lr=3e-3, clip=1.0,
             eval_every=4, eval_batches=1, probe_samples=4)


def _task(cfg: dict, *, batch_size: int, seed: int) -> CopyTask:
    return CopyTask(cfg["T"], batch_size=batch_size, seed=seed, n_copy=cfg["n_copy"])


def recall_flow(model, task: CopyTask, x, y) -> dict:
    """‖∂L_recall/∂x_t‖ (batch mean) at the symbol steps over the marker step, in float64."""
    m64 = copy.deepcopy(model).double()
    prof = gradient_profile(m64, x.double(), loss=lambda out: task.recall_loss(out, y))
    norms = prof.per_sample.mean(0)  # (T',) float64
    k, marker = task.n_copy, task.n_copy + task.T - 1
    symbols = norms[:k].mean().item()
    at_marker = norms[marker].item()
    return {"symbols": symbols, "marker": at_marker,
            "ratio": symbols / at_marker if at_marker > 0 else float("nan")}


def memory_times(model, x) -> dict:
    """Median and largest memory time 1/(1 − gate) over the units."""
    tau = gate_stats(model.rnn, x).layers[0].memory_time.double()
    return {"median": tau.median().item(), "max": tau.max().item()}


def evaluate(model, task: CopyTask, batches) -> dict:
    with torch.no_grad():
        acc, rec, full = [], [], []
        for x, y in batches:
            out = model(x)
            acc.append(task.recall_accuracy(out, y).mean().item())
            rec.append(task.recall_loss(out, y).mean().item())
            full.append(task.per_sample_loss(out, y).mean().item())
    n = len(batches)
    return {"recall_accuracy": sum(acc) / n, "recall_loss": sum(rec) / n,
            "loss": sum(full) / n}


def train(name: str, cfg: dict, seed: int, *, say=print) -> dict:
    """Train one variant with one seed; returns its measurements."""
    task = _task(cfg, batch_size=cfg["batch_size"], seed=seed)
    eval_task = _task(cfg, batch_size=cfg["batch_size"], seed=seed + 10_000)
    eval_batches = [eval_task.batch() for _ in range(cfg["eval_batches"])]
    probe = _task(cfg, batch_size=cfg["probe_samples"], seed=seed + 20_000)
    px, py = probe.batch()
    model = build_variant(name, task, cfg["hidden_size"], seed=seed)
    out = {"variant": name, "description": VARIANT_HELP[name], "seed": seed,
           "flow_init": recall_flow(model, probe, px, py), "tau_init": memory_times(model, px),
           "eval_init": evaluate(model, task, eval_batches)}
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    curve, t0 = [], time.perf_counter()
    for step in range(cfg["steps"]):
        x, y = task.batch()
        loss = task.per_sample_loss(model(x), y).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            ev = evaluate(model, task, eval_batches)
            curve.append({"step": step + 1, **ev})
            say(f"  {name} seed {seed} step {step + 1}: train loss {loss.item():.5f}, "
                f"recall acc {ev['recall_accuracy']:.3f}, recall loss {ev['recall_loss']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    out.update({"seconds": time.perf_counter() - t0, "curve": curve, "final": curve[-1],
                "flow_end": recall_flow(model, probe, px, py),
                "tau_end": memory_times(model, px)})
    return out


def _row(r: dict) -> str:
    f = r["final"]
    return (f"{r['variant']:<12} {r['seed']:>4} {f['recall_accuracy']:>9.3f} "
            f"{f['recall_loss']:>10.3f} {f['loss']:>9.5f} "
            f"{r['flow_init']['ratio']:>11.3g} {r['flow_end']['ratio']:>11.3g} "
            f"{r['tau_init']['median']:>8.3g}/{r['tau_init']['max']:<8.3g} "
            f"{r['tau_end']['median']:>8.3g}/{r['tau_end']['max']:<8.3g} {r['seconds']:>7.0f}")


def main(argv: list[str] | None = None) -> dict:
    """Parse options, train every variant for every seed, print the table; returns the runs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes (T=30, 8 steps)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated (default 0,1)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated (default {','.join(VARIANTS)})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=None, help="write the runs as JSON here")
    for key, v in FULL.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(v), default=None,
                        help=f"(default {v}; --quick: {QUICK[key]})")
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    cfg.update({k: getattr(a, k) for k in FULL if getattr(a, k) is not None})
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = a.variants.split(",")
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    say = (lambda *_: None) if a.quick else (lambda s: print(s, flush=True))
    task = _task(cfg, batch_size=1, seed=0)
    say(f"copy task: T={cfg['T']}, {cfg['n_copy']} symbols from 8, sequence length "
        f"{task.length}; chance recall accuracy 1/8, memoryless recall loss log 8 = "
        f"{task.recall_baseline:.3f}, memoryless full loss {task.baseline:.5f}; config {cfg}, "
        f"seeds {seeds}, threads {a.threads}")
    runs = []

    def result():
        return {"config": cfg, "seeds": seeds, "variants": variants, "threads": a.threads,
                "chance_accuracy": 1 / task.n_symbols, "recall_baseline": task.recall_baseline,
                "baseline": task.baseline, "runs": runs}

    try:
        for seed in seeds:
            for name in variants:
                runs.append(train(name, cfg, seed, say=say))
                if a.out:  # after every run, so a long run that is stopped keeps what it did
                    with open(a.out, "w") as fh:
                        json.dump(result(), fh, indent=1, allow_nan=True)
    finally:
        torch.set_num_threads(threads)
    say(f"{'variant':<12} {'seed':>4} {'recall acc':>9} {'recall CE':>10} {'full CE':>9} "
        f"{'flow init':>11} {'flow end':>11} {'tau init med/max':>17} {'tau end med/max':>17} "
        f"{'seconds':>7}")
    for r in runs:
        say(_row(r))
    if a.out:
        say(f"runs: {a.out}")
    assert all(math.isfinite(r["final"]["loss"]) for r in runs)
    return result()


if __name__ == "__main__":
    main()
