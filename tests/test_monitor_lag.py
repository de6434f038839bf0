"""The monitor's per-lag row under a per-step loss: the gradient arriving at output step t,
carried back to earlier inputs, against an independent float64 autograd oracle."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnscope
from rnnscope.monitor import GradientMonitor


def _layer(rec, name):
    return rec.layers[name]


class Tagger(nn.Module):
    """Per-step head on a recurrent layer; keeps the output's gradient for the oracle."""

    def __init__(self, kind, layers, batch_first=True, dropout=0.0, vocab=None, I=5, H=7):
        super().__init__()
        self.emb = nn.Embedding(vocab, I) if vocab else None
        self.rnn = kind(I, H, num_layers=layers, batch_first=batch_first, dropout=dropout)
        self.head = nn.Linear(H, vocab or 3)
        self.batch_first = batch_first

    def forward(self, x):  # x: (B, T, I) or token ids (B, T)
        x = self.emb(x) if self.emb is not None else x
        self.seen_x = x.detach().clone()
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        out.retain_grad()
        self.seen_out = out
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out)


def _positions(T, P=16):
    steps = torch.arange(T)
    if T <= P:
        return steps
    return steps[torch.linspace(0, T - 1, P).round().long().unique()]


def oracle_lag_row(module, x, hx, g, batch_first, positions, forward=None):
    """Mean over (sample, position) of ‖∂(g_t · y_t)/∂x_{t−k}‖ by lag k, in float64, one
    autograd.grad per position on a float64 copy of the fused module (nothing of rnnscope).
    x (B, T, I) batch-major, g (B, T, F) batch-major; forward(m, x) -> batch-major output
    replaces the plain call (packed inputs, dropout masks)."""
    m = copy.deepcopy(module).double()
    x = x.double().requires_grad_(True)
    if forward is None:
        out, _ = m(x if batch_first else x.transpose(0, 1), hx)
        out = out if batch_first else out.transpose(0, 1)
    else:
        out = forward(m, x)
    B, T = x.shape[:2]
    sums = torch.zeros(T, dtype=torch.float64)
    counts = torch.zeros(T, dtype=torch.float64)
    for t in positions.tolist():
        (dx,) = torch.autograd.grad((g[:, t].double() * out[:, t]).sum(), x, retain_graph=True)
        n = dx.norm(dim=-1)  # (B, T)
        for b in range(B):
            if not (g[b, t] != 0).any():
                continue
            for s in range(t + 1):
                sums[t - s] += n[b, s]
                counts[t - s] += 1
    return sums / counts


def _train_tagger(model, steps, mon, B=6, T=12, seed=0, vocab=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    recs = []
    for _ in range(steps):
        if vocab:
            x = torch.randint(0, vocab, (B, T), generator=g)
            y = torch.randint(0, vocab, (B, T), generator=g)
        else:
            x = torch.randn(B, T, 5, generator=g)
            y = torch.randint(0, 3, (B, T), generator=g)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(B * T, -1), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        rec = mon.step()
        recs.append((rec, model.seen_x, model.seen_out.grad.detach().clone()))
        opt.step()
    return recs


def _record_and_oracle(kind, layers, batch_first, T=20, max_batch=4, vocab=None, dropout=0.0,
                       train=True):
    torch.manual_seed(1)
    model = Tagger(kind, layers, batch_first=batch_first, vocab=vocab, dropout=dropout)
    model.train(train)
    before = copy.deepcopy(model.rnn)
    with GradientMonitor(model, replay_every=1, max_batch=max_batch) as mon:
        ((rec, x, g),) = _train_tagger(model, 1, mon, T=T, vocab=vocab)
    g = g if batch_first else g.transpose(0, 1)
    n = max_batch
    want = oracle_lag_row(before, x[:n], None, g[:n], batch_first, _positions(T))
    got = torch.tensor([float(v) for v in rec.layers["rnn"].output_lag_grad.by_lag],
                       dtype=torch.float64)
    return got, want, rec


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
def test_output_lag_row_equals_float64_autograd_oracle(kind, layers, batch_first):
    got, want, _ = _record_and_oracle(kind, layers, batch_first)
    assert got.shape == want.shape == (20,)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-9)
    assert got[0] > 0 and got[10] > 0  # not a trivial all-zero row


def test_packed_sequences_take_the_batched_vjp_path_and_equal_the_oracle():
    torch.manual_seed(2)
    rnn = nn.LSTM(5, 7, num_layers=2, batch_first=True)
    head = nn.Linear(7, 3)
    before = copy.deepcopy(rnn)
    B, T = 6, 14
    lengths = torch.tensor([14, 9, 14, 3, 11, 7])
    x = torch.randn(B, T, 5)
    y = torch.randint(0, 3, (B, T))
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    with GradientMonitor(model, replay_every=1, max_batch=4) as mon:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        out.retain_grad()
        mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
        loss = nn.functional.cross_entropy(head(out)[mask], y[mask])
        loss.backward()
        rec = mon.step()
    g = out.grad * mask.unsqueeze(-1)  # a step past a sequence's end gets nothing

    def forward(m, x64):
        p = pack_padded_sequence(x64, lengths[:4], batch_first=True, enforce_sorted=False)
        o, _ = m(p)
        return pad_packed_sequence(o, batch_first=True, total_length=T)[0]

    want = oracle_lag_row(before, x[:4], None, g[:4], True, _positions(T), forward=forward)
    got = torch.tensor([float(v) for v in rec.layers["rnn"].output_lag_grad.by_lag],
                       dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("kind, layers, batch_first", [
    (nn.LSTM, 2, True), (nn.LSTM, 3, False), (nn.GRU, 3, True), (nn.RNN, 2, False)])
def test_training_dropout_takes_the_sweep_through_the_masks_and_equals_the_oracle(
        kind, layers, batch_first, monkeypatch):
    """Under training-mode inter-layer dropout the per-lag row comes from the closed-form
    sweep, which multiplies each layer's input gradient by the mask the kernel drew below it:
    equal to float64 autograd through the fused kernel layer by layer with those masks."""
    from reference import fused_layer_by_layer

    from rnnscope.monitor import output_lag

    def no_vjps(*a, **k):
        raise AssertionError("the batched-VJP path ran: the sweep should have")

    monkeypatch.setattr(output_lag, "_batched_norms", no_vjps)
    torch.manual_seed(3)
    model = Tagger(kind, layers, batch_first=batch_first, dropout=0.4).train()
    before = copy.deepcopy(model.rnn)
    B, T = 6, 16
    x = torch.randn(B, T, 5)
    y = torch.randint(0, 3, (B, T))
    with GradientMonitor(model, replay_every=1, max_batch=3) as mon:
        state = torch.get_rng_state()
        nn.functional.cross_entropy(model(x).reshape(B * T, 3), y.reshape(-1)).backward()
        rec = mon.step()
    assert not rec.skipped
    g = model.seen_out.grad
    g = g if batch_first else g.transpose(0, 1)
    xm = x if batch_first else x.transpose(0, 1)
    masks = rnnscope.replay(before, xm, rng_state=state).dropout_masks  # what the kernel drew
    assert len(masks) == layers - 1 and all(bool((mk == 0).any()) for mk in masks)

    def forward(m, x64):
        xin = x64 if batch_first else x64.transpose(0, 1)
        out = fused_layer_by_layer(m, xin, None, [mk[:3].double() for mk in masks])
        return out if batch_first else out.transpose(0, 1)

    want = oracle_lag_row(before, x[:3], None, g[:3], True, _positions(T), forward=forward)
    got = torch.tensor([float(v) for v in rec.layers["rnn"].output_lag_grad.by_lag],
                       dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-9)


def test_bidirectional_says_why_there_is_no_lag_row():
    torch.manual_seed(4)
    rnn = nn.GRU(5, 7, batch_first=True, bidirectional=True)
    head = nn.Linear(14, 3)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    with GradientMonitor(model, replay_every=1) as mon:
        out, _ = rnn(torch.randn(4, 10, 5))
        nn.functional.cross_entropy(head(out).reshape(40, 3),
                                    torch.randint(0, 3, (40,))).backward()
        rec = mon.step()
    lay = _layer(rec, "rnn")
    assert lay.output_lag_grad.by_lag is None
    assert "bidirectional" in lay.output_lag_grad.note
    assert lay.state_grad  # the rest of the exact part is there
    assert rec.to_dict()["layers"]["rnn"]["output_lag_note"] == lay.output_lag_grad.note


def test_a_last_step_loss_has_no_lag_row_and_keeps_the_input_profile():
    torch.manual_seed(5)
    model = Tagger(nn.LSTM, 1)
    with GradientMonitor(model, replay_every=1) as mon:
        logits = model(torch.randn(4, 10, 5))
        nn.functional.cross_entropy(logits[:, -1], torch.randint(0, 3, (4,))).backward()
        rec = mon.step()
    lay = _layer(rec, "rnn")
    assert lay.output_lag_grad is None
    assert len(lay.input_grad.mean) == 10


class CharLM(nn.Module):
    def __init__(self, vocab=20, E=8, H=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, E)
        self.lstm = nn.LSTM(E, H, num_layers=2, batch_first=True)
        self.dec = nn.Linear(H, vocab)

    def forward(self, ids):
        out, _ = self.lstm(self.emb(ids))
        return self.dec(out)


def _char_batches(vocab=20, B=8, T=40, steps=4):
    # a text-like stream: a repeated phrase with noise, so the model has something to learn
    g = torch.Generator().manual_seed(0)
    base = torch.arange(T + 1) % 7 + 3
    for _ in range(steps):
        seq = base.repeat(B, 1)
        flip = torch.rand(B, T + 1, generator=g) < 0.2
        seq = torch.where(flip, torch.randint(0, vocab, (B, T + 1), generator=g), seq)
        yield seq[:, :-1], seq[:, 1:]


def test_char_lm_heatmap_is_no_longer_flat_and_equals_lag_profile():
    """Per-step cross-entropy (reduction='sum', so g_t is exactly ∂ℓ_t/∂y_t): the monitor's
    lag row equals lag_profile's by_lag at the same positions, and it decays with lag where the
    old per-timestep input profile is flat."""
    torch.manual_seed(6)
    model = CharLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    T = 40
    with GradientMonitor(model, replay_every=1, max_batch=8) as mon:
        for ids, tgt in _char_batches(T=T):
            loss = nn.functional.cross_entropy(model(ids).reshape(-1, 20), tgt.reshape(-1),
                                               reduction="sum")
            opt.zero_grad()
            loss.backward()
            rec = mon.step()
            last = (ids, tgt, copy.deepcopy(model.state_dict()))  # not the hooked module
            opt.step()
    ids, tgt, weights = last
    m = CharLM()
    m.load_state_dict(weights)
    lay = _layer(rec, "lstm")
    row = torch.tensor([float(v) for v in lay.output_lag_grad.by_lag], dtype=torch.float64)
    # the same quantity from the public lag_profile (a per-step head: equal)
    lp = rnnscope.lag_profile(
        m, ids, at="lstm", positions=_positions(T).tolist(),
        loss=lambda logits: nn.functional.cross_entropy(
            logits.reshape(-1, 20), tgt.reshape(-1), reduction="none").view(8, T))
    torch.testing.assert_close(row, lp.by_lag().to(torch.float64), rtol=1e-4, atol=1e-10)
    # old behaviour: the summed per-step loss's input profile by lag is flat
    old = torch.tensor([float(v) for v in lay.input_grad.mean], dtype=torch.float64).flip(0)
    assert old[20:30].mean() > 0.5 * old[1:5].mean()  # no fall-off with lag
    # new: the gradient arriving at output step t falls off with lag
    assert row[0] / row[25] > 30


def test_plot_log_draws_the_output_step_rows_under_a_per_step_loss(tmp_path):
    from rnnscope import cli, plotting
    from rnnscope.monitor import read_jsonl

    torch.manual_seed(7)
    model = CharLM()
    log = tmp_path / "mon.jsonl"
    with GradientMonitor(model, replay_every=2, loggers=log) as mon:
        for ids, tgt in _char_batches(T=16):
            nn.functional.cross_entropy(model(ids).reshape(-1, 20), tgt.reshape(-1)).backward()
            mon.step()
            model.zero_grad()
    steps, _ = read_jsonl(log)
    which, rows = plotting.lag_heatmap_rows(steps, "lstm")
    assert which == "output" and [s for s, _ in rows] == [0, 2]  # the exact steps
    want = [float(v) for v in steps[2]["layers"]["lstm"]["output_lag_grad"]]
    assert rows[1][1] == want
    fig = plotting.plot_lag_heatmap(steps, "lstm")
    assert "output step t" in fig.axes[0].get_title()
    assert cli.main(["plot-log", str(log), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "heatmap_lstm.png").stat().st_size > 0
    # without per-step rows, the per-timestep input profile by lag k = T−1−t, as before
    old = [{k: v for k, v in r.items()} for r in steps]
    for r in old:
        r["layers"]["lstm"].pop("output_lag_grad", None)
    which, rows = plotting.lag_heatmap_rows(old, "lstm")
    assert which == "input" and len(rows) == 4
    assert rows[0][1] == [float(v) for v in steps[0]["layers"]["lstm"]["input_grad"]][::-1]


def test_a_step_wise_decoder_says_why_there_is_no_lag_row():
    from rnnscope.monitor import output_lag

    torch.manual_seed(8)
    gru, head = nn.GRU(5, 7, batch_first=True), nn.Linear(7, 3)
    model = nn.ModuleDict({"gru": gru, "head": head})
    x, y = torch.randn(4, 6, 5), torch.randint(0, 3, (4, 6))
    with GradientMonitor(model, replay_every=1) as mon:
        h, outs = None, []
        for t in range(6):  # one token per call, the state passed on
            o, h = gru(x[:, t:t + 1], h)
            outs.append(o)
        logits = head(torch.cat(outs, 1))
        nn.functional.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)).backward()
        rec = mon.step()
    lag = rec.layers["gru"].output_lag_grad
    assert lag.by_lag is None and lag.note == output_lag.CHAINED
    assert len(rec.layers["gru"].state_grad[(0, 0)].h) == 6  # joined along time as before
