import math

import pytest
import torch
from torch.nn import functional as F

from rnnscope.tasks import AddingTask, CopyTask, make_task


def test_copy_task_structure_of_every_sequence():
    task = CopyTask(T=30, batch_size=200, seed=1)
    x, y = task.batch()
    assert x.shape == (200, 50, 10) and y.shape == (200, 50)
    seq = x.argmax(-1)
    assert torch.equal(F.one_hot(seq, 10).float(), x)  # exactly one-hot
    symbols = seq[:, :10]
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (seq[:, 10:39] == 0).all()       # T − 1 = 29 blanks
    assert (seq[:, 39] == 9).all()          # the marker
    assert (seq[:, 40:] == 0).all()         # 10 blanks
    assert (y[:, :40] == 0).all()           # T + 10 blanks
    assert torch.equal(y[:, 40:], symbols)  # then the symbols
    assert y.max() <= 8                     # 9 output classes


def test_copy_baseline_is_exact_and_matches_the_memoryless_strategy():
    assert CopyTask(T=100).baseline == pytest.approx(0.173287, abs=5e-7)
    task = CopyTask(T=20, batch_size=4000, seed=2)
    x, y = task.batch()
    # blanks with certainty until the marker, then uniform over the 8 symbols
    logits = torch.full((4000, 40, 9), -1e9)
    logits[:, :30, 0] = 0.0
    logits[:, 30:, 1:] = 0.0
    loss = task.per_sample_loss(logits, y).mean().item()
    assert loss == pytest.approx(10 * math.log(8) / 40, rel=1e-6)
    assert loss == pytest.approx(task.baseline, rel=1e-6)


def test_adding_task_structure_and_baseline_on_a_large_sample():
    task = AddingTask(T=40, batch_size=100_000, seed=3)
    x, y = task.batch()
    assert x.shape == (100_000, 40, 2) and y.shape == (100_000, 1)
    vals, marks = x[..., 0], x[..., 1]
    assert ((vals >= 0) & (vals <= 1)).all()
    assert (marks[:, :20].sum(1) == 1).all() and (marks[:, 20:].sum(1) == 1).all()
    assert torch.allclose((vals * marks).sum(1, keepdim=True), y)
    # always predicting 1: MSE = Var(U + U) = 1/6 (standard error ≈ 0.0007 here)
    mse = AddingTask.per_sample_loss(torch.ones(100_000, 40, 1), y).mean().item()
    assert mse == pytest.approx(task.baseline, abs=3e-3)
    assert task.baseline == 1 / 6
    # and predicting the mean sum 1 is the best constant: shifting it hurts
    assert AddingTask.per_sample_loss(torch.full((100_000, 40, 1), 1.1), y).mean() > mse


def test_generators_are_seeded_and_validated():
    a, b = CopyTask(10, batch_size=3, seed=5), CopyTask(10, batch_size=3, seed=5)
    assert torch.equal(a.batch()[0], b.batch()[0])
    assert not torch.equal(a.batch()[0], CopyTask(10, batch_size=3, seed=6).batch()[0])
    with pytest.raises(ValueError, match="T must be a positive int; got 0"):
        make_task("copy", 0)
    with pytest.raises(ValueError, match="task must be one of copy, adding"):
        make_task("parity", 10)
    with pytest.raises(ValueError, match="T ≥ 2"):
        AddingTask(1)


def test_copy_recall_loss_and_accuracy_read_only_the_recall_steps():
    task = CopyTask(T=25, batch_size=300, seed=4, n_copy=5)
    x, y = task.batch()
    L = task.length
    assert L == 35 and task.recall_steps == slice(30, 35)
    assert (x.argmax(-1)[:, 29] == 9).all()  # the marker is the step just before the recall
    # a perfect copier: the right class with a large margin everywhere
    perfect = F.one_hot(y, 9).float() * 50.0
    assert (task.recall_accuracy(perfect, y) == 1).all()
    assert task.recall_loss(perfect, y).max() < 1e-12
    # blanks everywhere: every recalled symbol wrong, whatever the full loss says
    blanks = torch.zeros(300, L, 9)
    blanks[..., 0] = 50.0
    assert (task.recall_accuracy(blanks, y) == 0).all()
    # uniform over the 8 symbols on the recall steps: exactly the memoryless log 8
    uniform = torch.full((300, L, 9), -1e9)
    uniform[:, :30, 0] = 0.0
    uniform[:, 30:, 1:] = 0.0
    assert task.recall_loss(uniform, y).mean().item() == pytest.approx(math.log(8), rel=1e-6)
    assert task.recall_baseline == pytest.approx(math.log(8))
    # one wrong symbol of five in one sample, by hand
    one_off = perfect.clone()
    wrong = int(y[0, 32]) % 8 + 1  # another symbol
    one_off[0, 32] = F.one_hot(torch.tensor(wrong), 9).float() * 50.0
    acc = task.recall_accuracy(one_off, y)
    assert acc[0].item() == pytest.approx(0.8) and (acc[1:] == 1).all()
    with pytest.raises(ValueError, match=r"outputs must be \(B, T'=35, 9\)"):
        task.recall_loss(perfect[:, :-1], y[:, :-1])
