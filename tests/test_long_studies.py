"""compare/inspect at long T: one replay per module and study, the same numbers as the
analyses called one by one, the causal Transformer's attention without a (T, T) mask, and the
size check that refuses a request before any work."""

import time

import pytest
import torch
from torch import nn

import rnnscope
from rnnscope import gates, jacobians, stream, studies
from rnnscope.models import build_model
from rnnscope.profile import random_inputs
from rnnscope.studies import compare_study, inspect_study


def _count_replays(monkeypatch):
    """Patch every name the analyses call `replay` / `stream.forward` by; returns a list that
    collects (what, module) per call."""
    calls = []
    real_replay, real_forward = rnnscope.replay, stream.forward

    def counted_replay(module, *a, **k):
        calls.append(("replay", module))
        return real_replay(module, *a, **k)

    def counted_forward(spec, *a, **k):
        calls.append(("stream", spec.module))
        return real_forward(spec, *a, **k)

    for mod in (studies, jacobians, gates):
        monkeypatch.setattr(mod, "replay", counted_replay)
    monkeypatch.setattr(stream, "forward", counted_forward)
    return calls


def _per_module(calls, module):
    return [what for what, m in calls if m is module]


@pytest.mark.parametrize("num_layers", [1, 2])
def test_compare_replays_each_module_once_and_matches_the_analyses(monkeypatch, num_layers):
    calls = _count_replays(monkeypatch)
    kw = dict(models=("rnn", "lstm", "gru"), seq_len=12, hidden_size=6, input_size=3,
              samples=5, num_layers=num_layers, jac_samples=2)
    res = compare_study(**kw)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    built = {k: build_model(k, 3, 6, num_layers=num_layers, t_max=12, generator=gen).eval()
             for k in kw["models"]}
    monkeypatch.undo()
    x = random_inputs(built["rnn"], seq_len=12, samples=5, seed=0)
    for kind, name in (("rnn", "RNN"), ("lstm", "LSTM"), ("gru", "GRU")):
        m = built[kind]
        rec = res.recurrent[name]
        # the modules compare built are fresh objects: find them by kind and size in the calls
        used = [(w, mm) for w, mm in calls if isinstance(mm, type(m))]
        whats = [w for w, _ in used]
        # one graph-free replay of the Jacobian samples + one replay (with its graph) of the
        # batch, whatever the number of layers and analyses
        assert whats == ["replay", "replay"], whats
        state = "c" if kind == "lstm" else "h"
        for la in rec.layers:
            ref = dict(layer=la.layer, direction=la.direction)
            cj = rnnscope.cell_jacobians(m, x[:2], state=state, keep="norms", **ref)
            assert la.cell_jacobians == cj.norms()
            ly = rnnscope.lyapunov_spectrum(m, x[:2], k=1, **ref)
            torch.testing.assert_close(la.lyapunov.exponents, ly.exponents, rtol=0, atol=0)
        sg = rnnscope.state_gradients(m, x)
        for row_a, row_b in zip(rec.state_gradients.layers, sg.layers):
            for a, b in zip(row_a, row_b):
                torch.testing.assert_close(a.h, b.h, rtol=0, atol=0)
        if kind != "rnn":
            gs = rnnscope.gate_stats(m, x)
            for a, b in zip(rec.gates.layers, gs.layers):
                assert a.mean == b.mean and a.quantiles == b.quantiles


def test_inspect_replays_each_recurrent_submodule_once(monkeypatch):
    class TwoRecurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 5, batch_first=True)
            self.lstm = nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True)

        def forward(self, x):
            return self.lstm(self.gru(x)[0])[0]

    torch.manual_seed(0)
    model = TwoRecurrent().eval()
    x = torch.randn(4, 9, 3)
    calls = _count_replays(monkeypatch)
    res = inspect_study(model, inputs=x, jac_samples=2)
    assert _per_module(calls, model.gru) == ["replay", "replay"]
    assert _per_module(calls, model.lstm) == ["replay", "replay"]
    monkeypatch.undo()
    rec = res.recurrent["lstm"]
    x_lstm = model.gru(x)[0].detach()
    sg = rnnscope.state_gradients(model.lstm, x_lstm)
    for row_a, row_b in zip(rec.state_gradients.layers, sg.layers):
        for a, b in zip(row_a, row_b):
            torch.testing.assert_close(a.h, b.h)
            torch.testing.assert_close(a.c, b.c)
    for la in rec.layers:
        cj = rnnscope.cell_jacobians(model.lstm, x_lstm[:2], layer=la.layer,
                                     direction=la.direction, keep="norms")
        assert la.cell_jacobians == cj.norms()


def test_compare_streams_long_sequences_with_one_forward_per_analysis(monkeypatch):
    """Past stream.STREAM_STEPS the batch analyses stream over time: the Jacobian samples are
    replayed once and the batch goes through the chunked forward (no whole-batch graph)."""
    monkeypatch.setattr(stream, "STREAM_STEPS", 8)
    calls = _count_replays(monkeypatch)
    res = compare_study(models=("lstm",), seq_len=20, hidden_size=4, input_size=3, samples=3,
                        jac_samples=2)
    whats = [w for w, m in calls if isinstance(m, nn.LSTM)]
    assert whats.count("replay") == 1 and "stream" in whats, whats
    assert res.recurrent["LSTM"].state_gradients.layers[0][0].h.shape == (3, 20)


def _old_transformer_forward(m, x):
    """The encoder's own forward with an explicit (T, T) causal mask: what the model ran
    before it called scaled_dot_product_attention itself."""
    T = x.shape[1]
    z = m.proj(x) + m.positions(T, x)
    mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
    return m.encoder(z, mask=mask, is_causal=True)


@pytest.mark.parametrize("num_layers,hidden", [(1, 8), (2, 12)])
def test_transformer_attention_equals_the_masked_encoder(num_layers, hidden):
    m = build_model("transformer", 5, hidden, num_layers=num_layers,
                    generator=torch.Generator().manual_seed(0)).double()
    torch.manual_seed(1)
    x = torch.randn(3, 17, 5, dtype=torch.float64, requires_grad=True)
    y, y_old = m(x), _old_transformer_forward(m, x)
    torch.testing.assert_close(y, y_old, rtol=1e-12, atol=1e-12)
    g, = torch.autograd.grad(y[:, -1].pow(2).sum(), x)
    g_old, = torch.autograd.grad(y_old[:, -1].pow(2).sum(), x)
    torch.testing.assert_close(g, g_old, rtol=1e-12, atol=1e-12)
    assert g[:, :-1].abs().max() > 1e-3  # the last step does attend to the earlier ones
    # causal: changing step 10 leaves steps 0..9 as they were, and changes step 10
    x2 = x.detach().clone()
    x2[:, 10] += 1.0
    y2 = m(x2)
    torch.testing.assert_close(y2[:, :10], y[:, :10].detach(), rtol=0, atol=1e-13)
    assert (y2[:, 10] - y[:, 10]).abs().max() > 1e-3


def test_compare_refuses_an_impossible_length_before_any_work(monkeypatch):
    built = []
    monkeypatch.setattr(studies, "build_model", lambda *a, **k: built.append(1))
    t0 = time.perf_counter()
    with pytest.raises(MemoryError, match=r"compare: .*T=1000000.* needs an estimated "
                                          r"[\d.]+ [GT]B of memory"):
        compare_study(seq_len=10 ** 6)
    assert time.perf_counter() - t0 < 5 and not built


def test_compare_says_the_transformer_profile_is_quadratic_in_time(monkeypatch):
    said = []
    compare_study(models=("transformer",), seq_len=8, hidden_size=4, input_size=3, samples=2,
                  progress=said.append)
    assert said == ["gradient profiles"]
    monkeypatch.setattr(studies, "LONG_ATTENTION", 5)
    said.clear()
    res = compare_study(models=("transformer",), seq_len=8, hidden_size=4, input_size=3,
                        samples=2, progress=said.append)
    assert len(said) == 1 and "O(T²) time" in said[0] and "T=8" in said[0]
    assert res.comparison.profiles["Transformer"].per_sample.shape == (2, 8)  # measured, not dropped


def test_auto_jacobian_samples_shrink_with_length_and_are_recorded():
    """"auto" keeps ≤ 1000 (sample, step) Jacobian pairs per module (4 samples up to T=250, at
    least 1), records the number used, and gives exactly what that number asked for gives."""
    f = studies.jacobian_samples_for
    assert [f("auto", T, 50) for T in (1, 100, 250, 251, 400, 1000, 5000)] == [4, 4, 4, 3, 2, 1, 1]
    assert f("auto", 10, 3) == 3 and f(7, 10_000, 50) == 7 and f(7, 10, 5) == 5
    kw = dict(models=("lstm", "gru"), seq_len=400, hidden_size=4, input_size=3, samples=5)
    auto = compare_study(**kw)
    assert auto.config["jacobian_samples"] == 2
    fixed = compare_study(**kw, jac_samples=2)
    for name in ("LSTM", "GRU"):
        a, b = auto.recurrent[name], fixed.recurrent[name]
        assert a.jacobian_samples == b.jacobian_samples == 2
        torch.testing.assert_close(a.layers[0].cell_jacobians.spectral,
                                   b.layers[0].cell_jacobians.spectral, rtol=0, atol=0)
    with pytest.raises(ValueError, match="jac_samples"):
        compare_study(**kw, jac_samples="all")
    # inspect resolves per module from the length that module receives
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    res = inspect_study(lstm, inputs=torch.randn(3, 600, 3))
    assert res.config["jacobian_samples"] == "auto"
    assert next(iter(res.recurrent.values())).jacobian_samples == 1
