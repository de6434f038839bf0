import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(2)


def snapshot(model):
    """Everything a measurement must leave untouched."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: (None if p.grad is None else p.grad.clone())
                  for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
    }


def assert_untouched(model, before):
    after = snapshot(model)
    for n in before["params"]:
        assert torch.equal(before["params"][n], after["params"][n]), f"parameter {n} changed"
        b, a = before["grads"][n], after["grads"][n]
        same = (b is None and a is None) or (b is not None and a is not None and torch.equal(b, a))
        assert same, f".grad of {n} changed"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]


@pytest.fixture
def untouched():
    return snapshot, assert_untouched
