"""Synthetic long-memory tasks with their exact memoryless baselines.

Copy task (the variant of Arjovsky, Shah & Bengio 2016):
    input  = 10 symbols from {1..8}, T−1 blanks (0), the marker 9, 10 blanks — length T + 20,
             one-hot over 10 classes;
    target = T + 10 blanks, then the 10 symbols — 9 output classes (0..8).
    A model that outputs blanks until the marker and then guesses uniformly among the 8
    symbols has cross-entropy 10·log 8 / (T + 20) per step (0.173287 at T = 100).

Adding task (the variant of Le, Jaitly & Hinton 2015 and Arjovsky et al. 2016; Hochreiter &
Schmidhuber's 1997 original differs: values in [−1, 1], variable length, target
0.5 + (X1 + X2)/4):
    input  = (T, 2): channel 0 values U[0, 1]; channel 1 a marker, 1 at exactly one position in
             the first half and one in the second half, 0 elsewhere;
    target = the sum of the two marked values. Always predicting 1 gives MSE Var(U+U) = 1/6.

Generators are seeded (torch.Generator on the CPU, so numbers do not depend on the device) and
move batches to any device. Shapes are batch-major: x (B, T', C_in), y as documented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


def _check(T, batch_size):
    for name, v in (("T", T), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int; got {v!r}")


@dataclass
class CopyTask:
    """The copy task with delay T (sequence length T + 20)."""

    T: int
    batch_size: int = 64
    seed: int = 0
    device: str | torch.device = "cpu"
    n_symbols: int = 8
    n_copy: int = 10

    input_size = 10  # blank 0, symbols 1..8, marker 9
    output_size = 9  # blank 0, symbols 1..8
    name = "copy"

    def __post_init__(self):
        _check(self.T, self.batch_size)
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def length(self) -> int:
        return self.T + 2 * self.n_copy

    @property
    def baseline(self) -> float:
        """Memoryless cross-entropy per step: 10·log 8 / (T + 20)."""
        return self.n_copy * math.log(self.n_symbols) / self.length

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T+20, 10) one-hot float, y (B, T+20) long class indices."""
        B, T, k = self.batch_size, self.T, self.n_copy
        symbols = torch.randint(1, self.n_symbols + 1, (B, k), generator=self.generator)
        seq = torch.zeros(B, self.length, dtype=torch.long)
        seq[:, :k] = symbols
        seq[:, k + T - 1] = 9  # the marker after T − 1 blanks
        target = torch.zeros(B, self.length, dtype=torch.long)
        target[:, T + k:] = symbols
        x = F.one_hot(seq, self.input_size).float()
        return x.to(self.device), target.to(self.device)

    @staticmethod
    def per_sample_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over steps for each sample: outputs (B, T', 9) -> (B,)."""
        ce = F.cross_entropy(outputs.transpose(1, 2), y, reduction="none")  # (B, T')
        return ce.mean(1)

    @property
    def recall_steps(self) -> slice:
        """The steps whose targets are the remembered symbols: the last n_copy of T + 2·n_copy."""
        return slice(self.T + self.n_copy, self.length)

    @property
    def recall_baseline(self) -> float:
        """Memoryless cross-entropy per recalled symbol: log n_symbols (uniform guessing)."""
        return math.log(self.n_symbols)

    def _recall(self, outputs, y):
        if outputs.dim() != 3 or outputs.shape[1] != self.length or y.shape != outputs.shape[:2]:
            raise ValueError(f"outputs must be (B, T'={self.length}, {self.output_size}) with y "
                             f"(B, {self.length}) for this copy task; got "
                             f"{tuple(outputs.shape)} and {tuple(y.shape)}")
        return outputs[:, self.recall_steps], y[:, self.recall_steps]

    def recall_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the recall steps only: outputs (B, T', 9) -> (B,).

        Only this part of the loss needs memory across the delay; compare with
        `recall_baseline`."""
        out, target = self._recall(outputs, y)
        return F.cross_entropy(out.transpose(1, 2), target, reduction="none").mean(1)

    def recall_accuracy(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fraction of the n_copy symbols recalled exactly (arg max over all 9 classes, so a
        blank counts as wrong): outputs (B, T', 9) -> (B,). Chance is 1/n_symbols."""
        out, target = self._recall(outputs, y)
        return (out.argmax(-1) == target).float().mean(1)


@dataclass
class AddingTask:
    """The adding task over T steps."""

    T: int
    batch_size: int = 64
    seed: int = 0
    device: str | torch.device = "cpu"

    input_size = 2
    output_size = 1
    name = "adding"
    baseline = 1.0 / 6.0  # MSE of always predicting 1

    def __post_init__(self):
        _check(self.T, self.batch_size)
        if self.T < 2:
            raise ValueError(f"the adding task needs T ≥ 2 (one marker per half); got {self.T}")
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def length(self) -> int:
        return self.T

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, 2), y (B, 1)."""
        B, T = self.batch_size, self.T
        values = torch.rand(B, T, generator=self.generator)
        half = T // 2
        first = torch.randint(0, half, (B,), generator=self.generator)
        second = torch.randint(half, T, (B,), generator=self.generator)
        marks = torch.zeros(B, T)
        rows = torch.arange(B)
        marks[rows, first] = 1.0
        marks[rows, second] = 1.0
        x = torch.stack([values, marks], dim=-1)
        y = (values[rows, first] + values[rows, second]).unsqueeze(1)
        return x.to(self.device), y.to(self.device)

    @staticmethod
    def per_sample_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Squared error of the last step's prediction: outputs (B, T, 1) -> (B,)."""
        return (outputs[:, -1] - y).pow(2).sum(-1)


TASKS = {"copy": CopyTask, "adding": AddingTask}


def make_task(name: str, T: int, **kwargs):
    """CopyTask or AddingTask by name."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {name!r}")
    return TASKS[name](T, **kwargs)
