import json
import math
import warnings

import pytest
import torch
from torch import nn

import rnnscope
from reference import seed_per_sample_loop


def _models():
    torch.manual_seed(0)
    return {"RNN": nn.RNN(6, 8, batch_first=True), "LSTM": nn.LSTM(6, 8, batch_first=True),
            "GRU": nn.GRU(6, 8, batch_first=True, num_layers=2)}


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_equals_the_seeds_per_sample_loop(name):
    model = _models()[name]
    prof = rnnscope.gradient_profile(model, seq_len=30, samples=7, seed=3)
    x = torch.randn(7, 30, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = seed_per_sample_loop(model, x.float())
    assert prof.per_sample.shape == (7, 30) and prof.per_sample.dtype == torch.float64
    torch.testing.assert_close(prof.per_sample, ref, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(prof.norms, ref.mean(0), rtol=1e-5, atol=1e-12)


def test_time_major_models_and_given_inputs():
    torch.manual_seed(1)
    m = nn.LSTM(4, 5)  # batch_first=False: inputs are (T, B, I)
    x = torch.randn(9, 3, 4)
    prof = rnnscope.gradient_profile(m, x)
    ref = seed_per_sample_loop(lambda xs: m(xs.transpose(0, 1))[0].transpose(0, 1),
                               x.transpose(0, 1))
    torch.testing.assert_close(prof.per_sample, ref, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match=r"\(T, B, I\) with I=4.*got \(9, 3, 7\)"):
        rnnscope.gradient_profile(m, torch.randn(9, 3, 7))


def test_leaves_the_model_exactly_as_found(untouched):
    snapshot, check = untouched
    m = nn.LSTM(4, 5, batch_first=True, num_layers=2)
    m(torch.randn(2, 3, 4))[0].sum().backward()  # mid-training: .grad already populated
    m.weight_ih_l1.requires_grad_(False)
    m.eval()
    before = snapshot(m)
    rnnscope.gradient_profile(m, seq_len=10, samples=3)
    check(m, before)
    m.train()
    before = snapshot(m)
    rnnscope.gradient_profile(m, seq_len=10, samples=3, loss="all")
    check(m, before)


def test_loss_options():
    m = _models()["LSTM"]
    x = torch.randn(3, 12, 6)
    last = rnnscope.gradient_profile(m, x, loss="last")
    custom = rnnscope.gradient_profile(m, x, loss=lambda out: out[0][:, -1].sum(-1))
    torch.testing.assert_close(last.per_sample, custom.per_sample)
    assert custom.loss == "custom"
    every = rnnscope.gradient_profile(m, x, loss="all")
    ref = []
    for s in range(3):
        xs = x[s:s + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(xs)[0].sum(), xs)
        ref.append(g[0].norm(dim=-1))
    torch.testing.assert_close(every.per_sample, torch.stack(ref).double(), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        rnnscope.gradient_profile(m, x, loss=lambda out: out[0].sum())
    with pytest.raises(ValueError, match="'last', 'all' or a callable"):
        rnnscope.gradient_profile(m, x, loss="first")


def test_user_model_returning_final_output_and_no_input_size():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 6, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    prof = rnnscope.gradient_profile(Classifier(), seq_len=8, samples=2)
    assert prof.per_sample.shape == (2, 8)
    with pytest.raises(ValueError, match="cannot tell the input size of a Sequential"):
        rnnscope.gradient_profile(nn.Sequential(nn.Linear(3, 3)))


def test_batch_norm_in_training_mode_is_refused():
    class Mixer(nn.Module):
        input_size = 3

        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(x.transpose(1, 2)).transpose(1, 2)

    with pytest.raises(ValueError, match="mixes the samples"):
        rnnscope.gradient_profile(Mixer(), seq_len=4, samples=3)
    assert rnnscope.gradient_profile(Mixer().eval(), seq_len=4, samples=3).finite


def test_nonfinite_gradients_are_counted_and_reported():
    m = nn.RNN(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    x[1, 2, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 non-finite input"):
        prof = rnnscope.gradient_profile(m, x)
    assert prof.nonfinite_inputs == 1 and prof.nonfinite_grads > 0
    assert not prof.finite
    assert math.isnan(prof.decay_rate()) and math.isnan(prof.decay_ratio())
    assert prof.effective_memory() is None
    d = prof.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON even with NaN inside
    assert d["decay_ratio"] == "nan"


def test_summaries_from_known_norms():
    k = torch.arange(20, dtype=torch.float64)
    norms_by_distance = 3.0 * torch.exp(-0.25 * k)
    per_sample = norms_by_distance.flip(0).unsqueeze(0)  # timestep order
    p = rnnscope.GradientProfile(per_sample)
    assert p.decay_rate() == pytest.approx(0.25, rel=1e-12)
    assert p.half_life() == pytest.approx(math.log(2) / 0.25, rel=1e-12)
    assert p.decay_ratio() == pytest.approx(math.exp(-0.25 * 19), rel=1e-12)
    torch.testing.assert_close(p.by_distance(), norms_by_distance)
    # exp(-0.25 k) > 0.01  <=>  k < 18.42: 19 timesteps
    assert p.effective_memory(0.01) == 19
    flat = rnnscope.GradientProfile(torch.ones(1, 5, dtype=torch.float64))
    assert flat.decay_rate() == 0 and flat.half_life() == math.inf
    vanished = rnnscope.GradientProfile(torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64))
    assert vanished.decay_ratio() == math.inf
    dead = rnnscope.GradientProfile(torch.zeros(1, 3, dtype=torch.float64))
    assert math.isnan(dead.decay_ratio()) and dead.effective_memory() == 0


def test_effective_memory_function():
    assert rnnscope.effective_memory(torch.tensor([0.001, 0.5, 1.0])) == 2
    assert rnnscope.effective_memory([1.0, 0.2], threshold=0.5) == 1
    with pytest.raises(ValueError, match="1 non-finite"):
        rnnscope.effective_memory(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        rnnscope.effective_memory([1.0], threshold=0)


def test_compare_shares_inputs_and_round_trips():
    models = _models()
    cmp = rnnscope.compare(models, seq_len=15, samples=4, seed=2)
    for name, m in models.items():
        alone = rnnscope.gradient_profile(m, seq_len=15, samples=4, seed=2)
        torch.testing.assert_close(cmp.profiles[name].per_sample, alone.per_sample)
    rows = cmp.table()
    assert [r["model"] for r in rows] == ["RNN", "LSTM", "GRU"]
    assert set(rows[0]) == {"model", "decay_ratio", "decay_rate", "half_life",
                            "effective_memory"}
    d = json.loads(json.dumps(cmp.to_dict(), allow_nan=False))
    back = rnnscope.Comparison.from_dict(d)
    for name in models:
        torch.testing.assert_close(back.profiles[name].per_sample, cmp.profiles[name].per_sample)
    assert "decay ratio" in str(cmp)
    with pytest.raises(ValueError, match="same input size"):
        rnnscope.compare({"a": nn.LSTM(3, 4), "b": nn.LSTM(5, 4)})


def test_seq_len_and_samples_validation():
    with pytest.raises(ValueError, match="seq_len must be a positive int; got 0"):
        rnnscope.gradient_profile(nn.LSTM(3, 4), seq_len=0)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        rnnscope.gradient_profile(nn.LSTM(3, 4), samples=-1)


def test_no_warning_on_clean_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnscope.gradient_profile(nn.GRU(3, 4, batch_first=True), seq_len=5, samples=2)


def test_drawn_inputs_with_as_many_samples_as_steps_on_a_time_major_model():
    # found by the fuzz suite: samples == seq_len made the time-major retry refuse itself and
    # an internal _TimeMajor exception escaped (message "compare: ")
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 8)
    prof = rnnscope.gradient_profile(lstm, seq_len=3, samples=3, seed=1)
    x = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # the drawn (S, T, I) batch is handed to the time-major LSTM as (T, S, I)
    given = rnnscope.gradient_profile(lstm, x.float().transpose(0, 1))
    assert prof.per_sample.shape == (3, 3)
    assert torch.equal(prof.per_sample, given.per_sample)
    cmp = rnnscope.compare({"lstm": lstm}, seq_len=3, samples=3, seed=1)
    assert torch.equal(cmp.profiles["lstm"].per_sample, prof.per_sample)


def test_comparison_table_says_when_a_half_life_is_extrapolated():
    """A half-life longer than the profile (ln 2 / rate past T) is named under the table."""
    from rnnscope.results import Comparison, GradientProfile

    k = torch.arange(20, dtype=torch.float64)
    slow = GradientProfile(torch.exp(-0.01 * k).flip(0).repeat(2, 1))  # half-life 69 > 20
    fast = GradientProfile(torch.exp(-0.5 * k).flip(0).repeat(2, 1))   # half-life 1.4
    assert slow.half_life() == pytest.approx(math.log(2) / 0.01)
    text = str(Comparison({"fast": fast, "slow": slow}))
    assert text.splitlines()[-1] == ("half-life past the steps measured (slow: 20 steps): "
                                     "extrapolated from the fitted per-step decay rate")
    assert "extrapolated" not in str(Comparison({"fast": fast}))
    # profiles of different lengths: each named with its own
    slow50 = GradientProfile(torch.exp(-0.01 * torch.arange(50.0)).flip(0).repeat(2, 1))
    text = str(Comparison({"slow": slow, "slow50": slow50, "fast": fast}))
    assert text.splitlines()[-1] == ("half-life past the steps measured (slow: 20 steps, "
                                     "slow50: 50 steps): extrapolated from the fitted per-step "
                                     "decay rate")
