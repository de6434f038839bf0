"""The analyses behind the CLI, called directly."""

import torch
from torch import nn

import rnnscope
from rnnscope.studies import compare_study, inspect_study
from rnnscope.study_results import StudyResult


class WithState(nn.Module):
    """An LSTM started from a learned initial state, passed as a keyword."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.h0 = nn.Parameter(torch.randn(1, 1, 5))
        self.c0 = nn.Parameter(torch.randn(1, 1, 5))

    def forward(self, x):
        B = x.shape[0]
        hx = (self.h0.expand(1, B, 5).contiguous(), self.c0.expand(1, B, 5).contiguous())
        return self.lstm(x, hx=hx)[0]


def test_inspect_analyses_submodules_with_the_state_they_received():
    torch.manual_seed(0)
    model = WithState().eval()
    x = torch.randn(4, 9, 3)
    res = inspect_study(model, inputs=x, jac_samples=2)
    rec = res.recurrent["lstm"]
    assert rec.hx_given is True and rec.jacobian_samples == 2 and rec.calls == 1
    hx = (model.h0.detach().expand(1, 4, 5), model.c0.detach().expand(1, 4, 5))
    sg = rnnscope.state_gradients(model.lstm, x, hx)
    torch.testing.assert_close(rec.state_gradients.layers[0][0].h, sg.layers[0][0].h)
    cj = rnnscope.cell_jacobians(model.lstm, x[:2], (hx[0][:, :2], hx[1][:, :2]), keep="norms")
    torch.testing.assert_close(rec.layers[0].cell_jacobians.spectral, cj.spectral)
    assert rec.layers[0].cell_jacobians == cj.norms()
    # and the zero-state analysis would differ: the initial state matters here
    sg0 = rnnscope.state_gradients(model.lstm, x)
    assert not torch.allclose(sg0.layers[0][0].h, sg.layers[0][0].h)
    assert not any(len(m._forward_pre_hooks) for m in model.modules())


def test_compare_study_is_reproducible_and_json_safe():
    import json

    a = compare_study(models=("rnn", "gru"), seq_len=8, hidden_size=6, input_size=3, samples=4)
    b = compare_study(models=("rnn", "gru"), seq_len=8, hidden_size=6, input_size=3, samples=4)
    text = json.dumps(a.to_dict(), allow_nan=False)
    assert json.loads(text)["schema"] == rnnscope.codec.SCHEMA
    assert StudyResult.from_dict(json.loads(text)) == a  # results.json reads back exactly
    assert a.comparison == b.comparison
    gru_a, gru_b = a.recurrent["GRU"], b.recurrent["GRU"]
    assert gru_a.layers[0].cell_jacobians == gru_b.layers[0].cell_jacobians
    assert set(a.recurrent) == {"RNN", "GRU"} and a.recurrent["RNN"].gates is None
    assert a.recurrent["GRU"].gates is not None


import pytest  # noqa: E402

from rnnscope import stream, studies  # noqa: E402


@pytest.mark.parametrize("streamed", [False, True])
def test_compare_profiles_of_recurrent_models_come_from_their_state_gradient_pass(
        monkeypatch, streamed):
    """compare_study takes a fused recurrent model's gradient profile from the backward of its
    state gradients (one replay, or the streamed chunks when the batch is large) instead of a
    forward and backward of its own: the profile is gradient_profile's on the same drawn
    inputs (to float32 rounding; same config, loss and site), and the Transformer's is
    gradient_profile's exactly."""
    built = {}
    real_build = studies.build_model

    def build(kind, *a, **k):
        built[kind] = real_build(kind, *a, **k)
        return built[kind]

    monkeypatch.setattr(studies, "build_model", build)
    if streamed:  # every batch counts as large: the chunked state gradients serve
        monkeypatch.setattr(stream, "large", lambda spec, B, T: True)
    stages = []
    res = compare_study(models=("rnn", "lstm", "gru", "transformer"), seq_len=40,
                        hidden_size=6, input_size=3, samples=4, num_layers=2, seed=3,
                        jac_samples=2, progress=stages.append)
    assert list(res.comparison.profiles) == ["RNN", "LSTM", "GRU", "Transformer"]
    assert "LSTM: state gradients and gradient profile" in stages
    monkeypatch.undo()
    for kind, name in (("rnn", "RNN"), ("lstm", "LSTM"), ("gru", "GRU"),
                       ("transformer", "Transformer")):
        got = res.comparison.profiles[name]
        want = rnnscope.gradient_profile(built[kind].eval(), seq_len=40, samples=4, seed=3)
        assert (got.config, got.loss, got.site, got.nonfinite_inputs, got.nonfinite_grads) \
            == (want.config, want.loss, want.site, 0, 0)
        if kind == "transformer":
            assert torch.equal(got.per_sample, want.per_sample)
        else:  # the replay's float32 rounding, not the fused kernel's
            torch.testing.assert_close(got.per_sample, want.per_sample, rtol=2e-5, atol=1e-12)
            assert got.per_sample[:, 0].min() > 0  # the far end still carries gradient
