"""The curse-of-memory measurement, its figure and its example script."""

import importlib.util
import pathlib

import pytest
import torch

from rnnscope.modern.sensitivity import curse_of_memory

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "curse_of_memory.py"


def test_measured_sensitivity_matches_closed_form_and_normalisation_tames_it():
    com = curse_of_memory([0.6, 0.9, 0.97], t=80, samples=600, seed=1)
    for s in ("none", "gamma_tied"):
        z = (com.measured[s] - com.closed[s]).abs() / com.stderr[s]
        assert bool((z < 4.5).all()), (s, z)
    # one power of 1/(1 − λ²) less with γ-normalised input, in the closed form and measured
    assert bool((com.measured["gamma_tied"] < com.measured["none"]).all())
    ratio = com.closed["none"] / com.closed["gamma_tied"]
    assert ratio[-1] > 5 * ratio[0]


def test_curse_of_memory_refuses_bad_options():
    with pytest.raises(ValueError, match="input_scales"):
        curse_of_memory([0.5], input_scales=("plain",))
    with pytest.raises(ValueError, match="samples"):
        curse_of_memory([0.5], samples=1)
    with pytest.raises(ValueError, match="0 ≤ λ < 1"):
        curse_of_memory([1.0], t=5, samples=4)


def test_example_runs_and_draws(tmp_path):
    spec = importlib.util.spec_from_file_location("rnnscope_example_curse", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "curse.png"
    res = mod.main(t=40, samples=300, out=str(out))
    assert out.is_file() and out.stat().st_size > 1000
    assert res["worst_z"] < 4.5
    assert torch.equal(res["curse"].lam, torch.tensor(mod.DECAYS, dtype=torch.float64))
