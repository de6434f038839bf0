"""A small, honest training harness: model variants on a long-memory task, with the
GradientMonitor recording gradient flow at every step.

Adam, gradient-norm clipping, fixed seeds (each variant sees the same batches), CPU or GPU.
For each variant it returns the loss curve against the task's exact baseline, the gradient
profile (with the task's own loss) at initialisation and at the end, the per-lag input-gradient
heatmap over training, and the forget/retain-gate memory-time distribution before and after.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import nn

from .gates import chrono_init, gate_stats, init_forget_bias
from .models import build_model
from .modern.protocol import is_decay_recurrence
from .monitor import AlertPolicy, GradientMonitor
from .profile import gradient_profile
from .codec import encode_float
from .recurrent import is_recurrent
from .tasks import make_task

VARIANTS = {
    "rnn": ("rnn", "default"),
    "lstm": ("lstm", "default"),
    "lstm-fb1": ("lstm", "1.0"),
    "lstm-chrono": ("lstm", "chrono"),
    "gru": ("gru", "default"),
    # the modern recurrences (models.KINDS), with their papers' initialisations
    "mingru": ("mingru", "default"),
    "minlstm": ("minlstm", "default"),
    "lru": ("lru", "default"),
    "rglru": ("rglru", "default"),
    "mamba": ("mamba", "default"),
    "slstm": ("slstm", "default"),
}
# `experiment` without --variants
DEFAULT_VARIANTS = ("rnn", "lstm", "lstm-fb1", "lstm-chrono", "gru")
VARIANT_HELP = {
    "rnn": "tanh RNN", "lstm": "LSTM, PyTorch default init",
    "lstm-fb1": "LSTM, effective forget bias 1", "lstm-chrono": "LSTM, chrono init (t_max = T)",
    "gru": "GRU, PyTorch default init",
    "mingru": "minGRU (Feng et al. 2024)", "minlstm": "minLSTM (Feng et al. 2024)",
    "lru": "LRU (Orvieto et al. 2023)", "rglru": "RG-LRU (De et al. 2024)",
    "mamba": "selective SSM, S6 (Gu & Dao 2023)", "slstm": "sLSTM (Beck et al. 2024)",
}


class SequenceModel(nn.Module):
    """A recurrent layer (any recurrent kind of models.KINDS) and a linear read-out at every
    step: (B, T, I) -> (B, T, O)."""

    def __init__(self, kind: str, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.input_size = input_size
        self.rnn = build_model(kind, input_size, hidden_size)
        # the recurrent layer's output width: H, but I for the LRU (y_t = Re(C h_t) + D u_t)
        with torch.no_grad():
            width = self.rnn(torch.zeros(1, 1, input_size))[0].shape[-1]
        self.head = nn.Linear(width, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def build_variant(name: str, task, hidden_size: int, *, seed: int) -> SequenceModel:
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {name!r}")
    kind, init = VARIANTS[name]
    torch.manual_seed(seed)  # same seed for every variant: differences come from the variant
    model = SequenceModel(kind, task.input_size, hidden_size, task.output_size)
    if init == "1.0":
        init_forget_bias(model.rnn, 1.0)
    elif init == "chrono":
        chrono_init(model.rnn, max(task.length, 3), generator=torch.Generator().manual_seed(seed))
    return model


@dataclass
class ExperimentConfig:
    task: str = "adding"
    T: int = 50
    steps: int = 3000
    batch_size: int = 64
    hidden_size: int = 64
    lr: float = 3e-3
    clip: float = 1.0
    variants: tuple = DEFAULT_VARIANTS
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 100
    eval_batches: int = 4
    profile_samples: int = 32

    def check(self) -> None:
        """Every option in range, and the memory estimate within what the machine has,
        before any work."""
        from .budget import check_memory, experiment_bytes
        from .checks import check_number

        fn = "experiment"
        for name in ("T", "steps", "batch_size", "hidden_size", "eval_every", "eval_batches",
                     "profile_samples"):
            check_number(fn, name, getattr(self, name), low=1, integer=True)
        check_number(fn, "seed", self.seed, low=0, integer=True)
        check_number(fn, "lr", self.lr, low=0, low_open=True, hint="e.g. 3e-3")
        check_number(fn, "clip", self.clip, low=0, low_open=True,
                     hint="the gradient-norm clipping bound, e.g. 1.0")
        if isinstance(self.variants, str) or not isinstance(self.variants, (tuple, list)):
            raise TypeError(f"{fn}: variants must be a tuple of names from "
                            f"{', '.join(VARIANTS)}; got {self.variants!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {', '.join(VARIANTS)}; "
                             f"got {', '.join(map(str, self.variants)) or 'none'}")
        task = make_task(self.task, self.T)  # validates task name and T
        check_memory(fn, experiment_bytes(T=self.T, steps=self.steps,
                                          batch_size=self.batch_size,
                                          hidden_size=self.hidden_size,
                                          variants=len(self.variants),
                                          profile_samples=self.profile_samples,
                                          seq_len=task.length),
                     f"training {len(self.variants)} variant(s) for {self.steps} steps on "
                     f"batches of {self.batch_size} × {task.length} steps with "
                     f"{self.hidden_size} hidden units",
                     "use a smaller T, batch size, hidden size or fewer steps")


def _evaluate(model, task_cls, batches) -> float:
    with torch.no_grad():
        losses = [task_cls.per_sample_loss(model(x), y).mean().item() for x, y in batches]
    return sum(losses) / len(losses)


def _profile(model, task_cls, x, y) -> dict:
    prof = gradient_profile(model, x, loss=lambda out: task_cls.per_sample_loss(out, y))
    return prof.to_dict()


def train_variant(name: str, cfg: ExperimentConfig, *, progress: Callable = None) -> dict:
    """Train one variant; returns its JSON-safe results."""
    task = make_task(cfg.task, cfg.T, batch_size=cfg.batch_size, seed=cfg.seed,
                     device=cfg.device)
    eval_task = make_task(cfg.task, cfg.T, batch_size=cfg.batch_size, seed=cfg.seed + 10_000,
                          device=cfg.device)
    eval_batches = [eval_task.batch() for _ in range(cfg.eval_batches)]
    probe = make_task(cfg.task, cfg.T, batch_size=cfg.profile_samples, seed=cfg.seed + 20_000,
                      device=cfg.device)
    px, py = probe.batch()
    model = build_variant(name, task, cfg.hidden_size, seed=cfg.seed).to(cfg.device)
    cls = type(task)
    gated = type(model.rnn) in (nn.LSTM, nn.GRU) or is_decay_recurrence(model.rnn)
    # the monitor watches nn.RNN/LSTM/GRU; a modern layer trains unmonitored (no heatmap)
    monitored = is_recurrent(model.rnn)
    out = {"variant": name, "description": VARIANT_HELP[name],
           "profile_init": _profile(model, cls, px, py),
           "gates_init": gate_stats(model.rnn, px).to_dict() if gated else None}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve, eval_curve, clipped = [], [], 0
    policy = AlertPolicy(warn=False, clip_after=0)
    t0 = time.perf_counter()
    with (GradientMonitor(model, every=1, replay_every=0, alerts=policy, history=cfg.steps)
          if monitored else contextlib.nullcontext()) as mon:
        for step in range(cfg.steps):
            x, y = task.batch()
            loss = cls.per_sample_loss(model(x), y).mean()
            opt.zero_grad()
            loss.backward()
            if mon is not None:
                mon.step()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            clipped += int(norm > cfg.clip)
            opt.step()
            curve.append(encode_float(loss.item()))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                eval_curve.append([step + 1, encode_float(_evaluate(model, cls, eval_batches))])
            if progress is not None and (step + 1) % max(cfg.steps // 20, 1) == 0:
                progress(f"{name}: step {step + 1}/{cfg.steps}")
        history = [r.to_dict() for r in mon.history] if mon is not None else []  # JSON form
    out.update({
        "train_loss": curve, "eval_loss": eval_curve, "seconds": round(time.perf_counter() - t0, 2),
        "clipped_fraction": clipped / cfg.steps,
        "monitor_steps": [r["step"] for r in history],
        "heatmap": [r["layers"]["rnn"].get("input_grad") for r in history],
        "global_norm": [r.get("global_norm") for r in history],
        "profile_end": _profile(model, cls, px, py),
        "gates_end": gate_stats(model.rnn, px).to_dict() if gated else None,
    })
    return out


def summarise(variant: dict, baseline: float) -> dict:
    """final loss / baseline, first step at which the (evaluation) loss beats 50% of the
    baseline, effective memory at initialisation and at the end."""
    from .results import GradientProfile

    final = float(variant["eval_loss"][-1][1])
    first = next((s for s, v in variant["eval_loss"] if float(v) < 0.5 * baseline), None)
    em = {}
    for when in ("init", "end"):
        em[when] = GradientProfile.from_dict(variant[f"profile_{when}"]).effective_memory()
    return {"model": variant["variant"], "final_over_baseline": final / baseline,
            "beats_half_baseline_at": first if first is not None else "never",
            "effective_memory_init": em["init"], "effective_memory_end": em["end"]}


def run_experiment(cfg: ExperimentConfig, *, progress: Callable = None) -> dict:
    """Train every variant of `cfg` on its task; returns one JSON-safe results dict."""
    from .studies import versions

    cfg.check()
    t0 = time.perf_counter()
    task = make_task(cfg.task, cfg.T)
    variants = {}
    for name in cfg.variants:
        variants[name] = train_variant(name, cfg, progress=progress)
    table = [summarise(v, task.baseline) for v in variants.values()]
    return {"command": "experiment", "config": {**cfg.__dict__, "variants": list(cfg.variants),
                                                 "sequence_length": task.length},
            "versions": versions(), "baseline": task.baseline, "variants": variants,
            "table": [{k: (encode_float(v) if isinstance(v, float) else v) for k, v in r.items()}
                      for r in table],
            "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["ExperimentConfig", "SequenceModel", "VARIANTS", "DEFAULT_VARIANTS",
           "build_variant", "run_experiment",
           "summarise", "train_variant"]
