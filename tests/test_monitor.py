import csv
import json
import warnings

import pytest
import torch
from torch import nn

import rnnscope
from reference import reference_forward
from rnnscope.monitor import AlertPolicy, GradientFlowWarning, GradientMonitor, read_jsonl


class Seq(nn.Module):
    """A small sequence regressor around a (possibly time-major) recurrent layer."""

    def __init__(self, kind=nn.LSTM, layers=2, bidirectional=False, batch_first=True):
        super().__init__()
        self.rnn = kind(5, 7, num_layers=layers, bidirectional=bidirectional,
                        batch_first=batch_first)
        self.head = nn.Linear(7 * (2 if bidirectional else 1), 1)
        self.batch_first = batch_first

    def forward(self, x):  # x: (B, T, 5) batch-major always
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out)


def _json(rec):
    """A step's Record in its JSON Lines form (what these tests were written against)."""
    return None if rec is None else rec.to_dict()


def _data(step, B=6, T=12):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, T, 5, generator=g), torch.randn(B, T, 1, generator=g)


def _train(model, steps, monitor=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outs, grads = [], []
    for s in range(steps):
        x, y = _data(s)
        out = model(x)
        loss = ((out - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.step()
        outs.append(out.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return outs, grads


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_outputs_and_gradients_are_bit_identical_with_the_monitor(kind):
    torch.manual_seed(0)
    a = Seq(kind)
    b = Seq(kind)
    b.load_state_dict(a.state_dict())
    outs_a, grads_a = _train(a, 4)
    with GradientMonitor(b, replay_every=2) as mon:
        outs_b, grads_b = _train(b, 4, mon)
    for oa, ob in zip(outs_a, outs_b):
        assert torch.equal(oa, ob)
    for ga, gb in zip(grads_a, grads_b):
        for x, y in zip(ga, gb):
            assert torch.equal(x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert len(mon.history) == 4


@pytest.mark.parametrize("bidirectional, batch_first", [(False, True), (True, False)])
def test_exact_state_gradients_and_input_profile_equal_autograd(bidirectional, batch_first):
    torch.manual_seed(1)
    model = Seq(nn.LSTM, layers=2, bidirectional=bidirectional, batch_first=batch_first).double()
    x, y = _data(0)
    x, y = x.double(), y.double()
    mon = GradientMonitor(model, replay_every=1, max_batch=4).attach()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    rec = _json(mon.step())
    mon.detach()
    # oracle 1: ∂L/∂x by autograd, per-sample norms averaged over the batch
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(((model(xr) - y) ** 2).mean(), xr)
    torch.testing.assert_close(torch.tensor(rec["layers"]["rnn"]["input_grad"],
                                            dtype=torch.float64), gx.norm(dim=-1).mean(0))
    # oracle 2: total state gradients of the real loss by retain_grad on the reference loop
    # (PyTorch's documented equations, tests/reference.py), first max_batch samples
    out, _, _, states = reference_forward(model.rnn, x)
    for dirs in states:
        for steps in dirs:
            for h, c in steps:
                h.retain_grad()
                c.retain_grad()
    ((model.head(out) - y) ** 2).mean().backward()
    for layer in range(2):
        for d in range(2 if bidirectional else 1):
            got = rec["layers"]["rnn"]["state_grad"][f"l{layer}d{d}"]
            steps = states[layer][d] if d == 0 else states[layer][d][::-1]  # position order
            for which, k in (("h", 0), ("c", 1)):
                want = torch.stack([s[k].grad[:4].norm(dim=-1).mean() for s in steps])
                torch.testing.assert_close(torch.tensor(got[which], dtype=torch.float64), want)
    xin = x if batch_first else x.transpose(0, 1)
    gates = rec["layers"]["rnn"]["gates"]["l0d0"]
    f = rnnscope.replay(model.rnn, xin).layers[0][0].gates["f"][:4].detach()
    assert gates["mean"] == pytest.approx(f.mean().item(), rel=1e-9)


def test_per_gate_parameter_norms_and_global_norm():
    torch.manual_seed(2)
    model = Seq(nn.GRU, layers=1)
    x, y = _data(0)
    with GradientMonitor(model) as mon:
        ((model(x) - y) ** 2).mean().backward()
        rec = _json(mon.step())
    norms = rec["layers"]["rnn"]["param_norms"]
    g = model.rnn.weight_hh_l0.grad
    for k, gate in enumerate("rzn"):
        assert norms[f"weight_hh_l0.{gate}"] == pytest.approx(g[7 * k:7 * (k + 1)].norm().item(),
                                                            rel=1e-6)
    total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    assert rec["global_norm"] == pytest.approx(total.item(), rel=1e-6)  # float32 norms


def test_cells_called_step_by_step():
    torch.manual_seed(3)

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.LSTMCell(5, 6)

        def forward(self, x):
            h = c = torch.zeros(x.shape[0], 6, dtype=x.dtype)
            hs = []
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
                hs.append(h)
            return torch.stack(hs, 1).sum(-1, keepdim=True)

    m = Loop().double()
    x, y = _data(0)
    x, y = x.double(), y.double()
    with GradientMonitor(m, replay_every=1) as mon:
        ((m(x) - y) ** 2).mean().backward()
        rec = _json(mon.step())
    # oracle: retain_grad on the reference unroll
    xr = x.clone().requires_grad_(True)
    h = c = torch.zeros(6, 6, dtype=torch.float64)
    hs, cs = [], []
    for t in range(12):
        h, c = m.cell(xr[:, t], (h, c))
        h.retain_grad()
        c.retain_grad()
        hs.append(h)
        cs.append(c)
    ((torch.stack(hs, 1).sum(-1, keepdim=True) - y) ** 2).mean().backward()
    r = rec["layers"]["cell"]
    torch.testing.assert_close(torch.tensor(r["input_grad"], dtype=torch.float64),
                               xr.grad.norm(dim=-1).mean(0))
    torch.testing.assert_close(torch.tensor(r["state_grad"]["l0d0"]["h"], dtype=torch.float64),
                               torch.stack([t.grad.norm(dim=-1).mean() for t in hs]))
    torch.testing.assert_close(torch.tensor(r["state_grad"]["l0d0"]["c"], dtype=torch.float64),
                               torch.stack([t.grad.norm(dim=-1).mean() for t in cs]))


def _hooks(m):
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) + len(x._backward_hooks)
               for x in m.modules())


def test_hooks_are_removed_on_detach_and_on_exceptions():
    model = Seq()
    assert _hooks(model) == 0
    mon = GradientMonitor(model).attach()
    assert _hooks(model) == 2  # one pre-hook and one forward hook on the LSTM
    mon.detach()
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with GradientMonitor(model):
            assert _hooks(model) > 0
            model(torch.randn(2, 3, 5)).sum().backward()
            raise RuntimeError("boom")
    assert _hooks(model) == 0
    # a step that raises leaves no tensor hooks or captures behind
    mon = GradientMonitor(model, replay_every=1).attach()
    model(torch.randn(2, 3, 5))
    assert mon._caps["rnn"].tensor_handles
    mon.detach()
    assert not mon._caps["rnn"].tensor_handles and _hooks(model) == 0


def test_schedules_and_bounded_history():
    model = Seq(nn.GRU, layers=1)
    mon = GradientMonitor(model, every=2, replay_every=3, history=2).attach()
    recs = []
    for s in range(7):
        x, y = _data(s)
        ((model(x) - y) ** 2).mean().backward()
        recs.append(_json(mon.step()))
        model.zero_grad()
    mon.detach()
    assert [r is not None for r in recs] == [True, False, True, True, True, False, True]
    assert [r["exact"] for r in recs if r] == [True, False, True, False, True]
    assert "input_grad" not in recs[3]["layers"]["rnn"]  # step 3: exact only
    assert len(mon.history) == 2 and mon.history[-1].step == 6


def test_alerts_fire_rate_limited_and_reach_loggers_and_callback(tmp_path):
    torch.manual_seed(0)
    model = Seq(nn.RNN, layers=1)
    got = []
    policy = AlertPolicy(vanish_lag=5, vanish_eps=0.5, explode_factor=5, min_history=3,
                         clip_after=6, cooldown=3, callback=got.append)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.warns(GradientFlowWarning):
        with GradientMonitor(model, replay_every=0, alerts=policy,
                             loggers=[tmp_path, tmp_path / "m.csv"]) as mon:
            for s in range(8):
                x, y = _data(s, T=30)
                scale = 1e4 if s == 5 else 1.0
                # a loss at the last step only: the input profile then shows the decay by lag
                loss = scale * ((model(x)[:, -1] - y[:, -1]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                mon.step()
            with torch.no_grad():
                x, y = _data(99, T=30)
            loss = ((model(x) - y) ** 2).mean() * float("nan")
            opt.zero_grad()
            loss.backward()
            mon.step()
    kinds = [a.kind for a in got]
    assert "exploding" in kinds and "clipping" in kinds and "nonfinite" in kinds
    vanishing = [a for a in got if a.kind == "vanishing"]
    assert vanishing and all(b.step - a.step >= 3 for a, b in zip(vanishing, vanishing[1:]))
    explode = next(a for a in got if a.kind == "exploding")
    assert explode.step == 5 and "running median" in explode.message
    nonfinite = [a for a in got if a.kind == "nonfinite"]
    assert any("rnn.weight_hh_l0" in a.message for a in nonfinite)
    # every gradient is NaN: one alert names the parameters, not one alert (and warning) each
    params = [a for a in nonfinite if a.layer == "parameters"]
    assert len(params) == 1 and params[0].step == 8
    total = sum(p.numel() for p in model.parameters())
    assert params[0].value == total
    assert f"{total} non-finite (NaN/Inf) gradient value(s) in 6 parameter(s): " \
           "rnn.weight_ih_l0 (35), rnn.weight_hh_l0 (49)" in params[0].message
    assert params[0].message.endswith("and 2 more")
    steps, alerts = read_jsonl(tmp_path / "rnnscope-monitor.jsonl")
    assert [s["step"] for s in steps] == list(range(9))
    assert len(alerts) == len(got)
    assert steps[-1]["nonfinite_params"]["rnn.weight_hh_l0"] == 7 * 7
    assert steps[-1]["global_norm"] == "nan"
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert {r["name"] for r in rows} >= {"grad_norm/global", "rnn/input_grad/lag0"}


def test_saturation_alert_at_replay_steps():
    torch.manual_seed(0)
    model = Seq(nn.LSTM, layers=1)
    rnnscope.init_forget_bias(model.rnn, 12.0)  # f ≈ 1: a frozen memory
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradientMonitor(model, replay_every=1,
                             alerts=AlertPolicy(callback=got.append)) as mon:
            x, y = _data(0)
            ((model(x) - y) ** 2).mean().backward()
            rec = _json(mon.step())
    assert rec["layers"]["rnn"]["gates"]["l0d0"]["frac_units_hi"] == 1.0
    sat = [a for a in got if a.kind == "saturation"]
    assert sat and "100% of units have a mean f gate > 0.99" in sat[0].message


def _reference_state_grads(model, x, y, masks):
    """Independent loop (per-gate reference steps, the kernel's own dropout masks): per layer,
    (B, T) norms of the total ∂L/∂h_t of the training loss ((model(x) − y)²).mean()."""
    from reference import layer_params, reference_step

    lstm = model.rnn
    B, T = x.shape[:2]
    inp, hs = x, []
    for layer in range(lstm.num_layers):
        p = layer_params(lstm, layer, 0)
        h = x.new_zeros(B, lstm.hidden_size)
        c = x.new_zeros(B, lstm.hidden_size)
        seq = []
        for t in range(T):
            h, c = reference_step("lstm", p, inp[:, t], h, c)
            h.retain_grad()
            seq.append(h)
        hs.append(seq)
        inp = torch.stack(seq, 1)
        if layer < lstm.num_layers - 1:
            inp = inp * masks[layer]
    loss = ((model.head(inp) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, [h for seq in hs for h in seq])
    return [torch.stack(grads[l * T:(l + 1) * T], 1).norm(dim=-1) for l in range(len(hs))]


@pytest.mark.parametrize("max_batch", [6, 3])
def test_training_dropout_keeps_the_exact_part(max_batch):
    """max_batch below the batch size included: the masks were drawn for the whole batch."""
    torch.manual_seed(0)
    model = Seq(nn.LSTM, layers=2).double()
    model.rnn.dropout = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientFlowWarning)
        with GradientMonitor(model, replay_every=1, max_batch=max_batch) as mon:
            for s in range(2):
                x, y = _data(s)
                x, y = x.double(), y.double()
                state = torch.get_rng_state()
                ((model(x) - y) ** 2).mean().backward()
                rec = _json(mon.step())
    assert "skipped" not in rec
    # the masks the kernel drew in that last step, recovered from the RNG state before it
    masks = rnnscope.replay(model.rnn, x, rng_state=state).dropout_masks
    ref = _reference_state_grads(model, x, y, masks)
    for layer in range(2):
        got = torch.tensor(rec["layers"]["rnn"]["state_grad"][f"l{layer}d0"]["h"],
                           dtype=torch.float64)
        torch.testing.assert_close(got, ref[layer][:max_batch].mean(0), rtol=1e-9,
                                   atol=1e-14)
    # and the training itself did not change: the monitor takes no random numbers
    outs_with = _train_dropout(model, monitor=True)
    outs_without = _train_dropout(model, monitor=False)
    assert all(torch.equal(a, b) for a, b in zip(outs_with, outs_without))


def _train_dropout(model, monitor):
    import copy

    m = copy.deepcopy(model)
    torch.manual_seed(5)
    mon = GradientMonitor(m, replay_every=1).attach() if monitor else None
    outs = []
    for s in range(3):
        x, _ = _data(s)
        out = m(x.double())
        out.sum().backward()
        if mon is not None:
            mon.step()
        outs.append(out.detach())
    if mon is not None:
        mon.close()
    return outs


def test_forward_without_backward_makes_no_record():
    model = Seq(nn.GRU, layers=1)
    with GradientMonitor(model, replay_every=1) as mon:
        x, y = _data(0)
        ((model(x) - y) ** 2).mean().backward()
        assert mon.step() is not None
        with pytest.warns(GradientFlowWarning, match="no backward"):
            model(x)  # a validation pass with grad enabled, no backward
            assert mon.step() is None
    assert len(mon.history) == 1


def test_checkpointed_training_is_unchanged_by_the_monitor():
    from torch.utils.checkpoint import checkpoint

    class Ckpt(Seq):
        def forward(self, x):
            out = checkpoint(lambda z: self.rnn(z)[0], x, use_reentrant=False)
            return self.head(out)

    def run(monitor):
        torch.manual_seed(0)
        m = Ckpt(nn.LSTM, layers=2)
        mon = GradientMonitor(m, replay_every=1).attach() if monitor else None
        x, y = _data(0)
        ((m(x) - y) ** 2).mean().backward()
        rec = _json(mon.step()) if mon else None
        if mon:
            mon.close()
        return [p.grad.clone() for p in m.parameters()], rec

    g0, _ = run(False)
    g1, rec = run(True)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert "state_grad" in rec["layers"]["rnn"] and "input_grad" in rec["layers"]["rnn"]


def test_stepwise_decoder_is_one_time_axis():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(5, 7, batch_first=True)
            self.head = nn.Linear(7, 1)

        def forward(self, x):  # one call per step, state chained, as seq2seq decoders do
            h, outs = None, []
            for t in range(x.shape[1]):
                o, h = self.gru(x[:, t:t + 1], h)
                outs.append(self.head(o))
            return torch.cat(outs, 1)

    torch.manual_seed(0)
    model = Decoder().double()
    x, y = _data(0)
    x, y = x.double(), y.double()
    with GradientMonitor(model, replay_every=1, max_batch=6) as mon:
        ((model(x) - y) ** 2).mean().backward()
        rec = _json(mon.step())
    r = rec["layers"]["gru"]
    assert len(r["input_grad"]) == 12 and len(r["state_grad"]["l0d0"]["h"]) == 12
    # reference: the same GRU unrolled over the whole sequence in one call
    xs = x.clone().requires_grad_(True)
    out, _ = model.gru(xs)
    states = []
    ref_loss = ((model.head(out) - y) ** 2).mean()
    (gx,) = torch.autograd.grad(ref_loss, xs)
    torch.testing.assert_close(torch.tensor(r["input_grad"], dtype=torch.float64),
                               gx.norm(dim=-1).mean(0), rtol=1e-9, atol=1e-14)
    # ∂L/∂h_t: the gradient reaching each step's output, plus what flows back from later steps
    from reference import reference_forward
    _, _, _, st = reference_forward(model.gru, x)
    hs = [h for h, _ in st[0][0]]
    for h in hs:
        h.retain_grad()
    ref2 = ((model.head(torch.stack(hs, 1)) - y) ** 2).mean()
    gh = torch.autograd.grad(ref2, hs)
    torch.testing.assert_close(torch.tensor(r["state_grad"]["l0d0"]["h"], dtype=torch.float64),
                               torch.stack(gh, 1).norm(dim=-1).mean(0), rtol=1e-9, atol=1e-14)
    del states


def test_packed_inputs_are_measured_per_length():
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(5, 7, batch_first=True, bidirectional=True)
            self.head = nn.Linear(14, 1)

        def forward(self, x, lengths):
            p = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(p)[0], batch_first=True, total_length=x.shape[1])
            return self.head(out)

    torch.manual_seed(0)
    model = Tagger().double()
    x, y = _data(0)
    x, y = x.double(), y.double()
    lengths = torch.tensor([12, 3, 7, 12, 1, 5])
    with GradientMonitor(model, replay_every=1, max_batch=6) as mon:
        mask = (torch.arange(12)[None, :] < lengths[:, None]).unsqueeze(-1)
        (((model(x, lengths) - y) ** 2) * mask).sum().backward()
        rec = _json(mon.step())
    r = rec["layers"]["rnn"]
    # reference: each sample alone, unpacked, over its own length
    sums, counts = torch.zeros(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    for b in range(6):
        n = int(lengths[b])
        xb = x[b:b + 1, :n].clone().requires_grad_(True)
        out, _ = model.rnn(xb)
        (g,) = torch.autograd.grad(((model.head(out) - y[b:b + 1, :n]) ** 2).sum(), xb)
        sums[:n] += g[0].norm(dim=-1)
        counts[:n] += 1
    torch.testing.assert_close(torch.tensor(r["input_grad"], dtype=torch.float64),
                               sums / counts, rtol=1e-9, atol=1e-14)
    assert set(r["state_grad"]) == {"l0d0", "l0d1"}


def test_plot_log_cli(tmp_path):
    import subprocess
    import sys

    model = Seq(nn.GRU, layers=1)
    with GradientMonitor(model, loggers=tmp_path) as mon:
        for s in range(5):
            x, y = _data(s)
            ((model(x) - y) ** 2).mean().backward()
            mon.step()
            model.zero_grad()
    p = subprocess.run([sys.executable, "-m", "rnnscope", "plot-log",
                        str(tmp_path / "rnnscope-monitor.jsonl"), "--out",
                        str(tmp_path / "plots"), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    files = json.loads(p.stdout)["files"]
    assert any(f.endswith("heatmap_rnn.png") for f in files)
    assert all((tmp_path / "plots" / f.split("/")[-1]).stat().st_size > 1000 for f in files)

    def plot_log(*args):
        return subprocess.run([sys.executable, "-m", "rnnscope", "plot-log", *args],
                              capture_output=True, text=True)

    # the folder the monitor logged to (as the README's loggers="runs/exp1") is read too
    p = plot_log(str(tmp_path), "--out", str(tmp_path / "again"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["steps"] == 5
    p = plot_log(str(tmp_path / "plots"), "--out", str(tmp_path / "x"))
    assert p.returncode == 1
    assert "plots is a folder without rnnscope-monitor.jsonl" in p.stderr
    csv_log = tmp_path / "run.csv"
    csv_log.write_text("step,name,value\n0,grad_norm/global,1.0\n")
    p = plot_log(str(csv_log), "--out", str(tmp_path / "y"))
    assert p.returncode == 1 and "run.csv is a CSV log; plot-log draws the JSON Lines" in p.stderr
    # a warning reads as the command's own line, also with --quiet (it is about the data)
    lines = (tmp_path / "rnnscope-monitor.jsonl").read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-1] + [lines[-1][:40]]) + "\n")
    p = plot_log(str(cut), "--out", str(tmp_path / "z"), "--quiet")
    assert p.returncode == 0 and p.stdout == ""
    assert p.stderr.startswith("rnnscope plot-log: warning: ") and "cut short" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and ".py:" not in p.stderr


def test_constructor_errors():
    with pytest.raises(ValueError, match="contains no nn.RNN"):
        GradientMonitor(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="preset must be one of"):
        GradientMonitor(Seq(), preset="turbo")
    with pytest.raises(TypeError, match="a logger is"):
        GradientMonitor(Seq(), loggers=[3])
    with pytest.raises(ValueError, match="vanish_eps"):
        AlertPolicy(vanish_eps=2)
    # a dict of thresholds used to pass here and fail at the first step()
    with pytest.raises(TypeError, match="alerts must be an rnnscope.monitor.AlertPolicy.*got "
                                        "dict"):
        GradientMonitor(Seq(), alerts={"explode_norm": 1.0})
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="start_step must be an int ≥ 0"):
            GradientMonitor(Seq(), start_step=bad)


def test_a_resumed_run_continues_its_step_numbers():
    model = Seq()
    with GradientMonitor(model, replay_every=3, start_step=4) as mon:
        _train(model, 3, mon)
    assert [r.step for r in mon.history] == [4, 5, 6]
    assert [r.exact for r in mon.history] == [False, False, True]  # the schedule's steps too


def test_logger_paths(tmp_path):
    taken = tmp_path / "train.log"
    taken.write_text("the user's own log\n")
    with pytest.raises(ValueError, match="train.log' is an existing file.*folder"):
        GradientMonitor(Seq(), loggers=taken)
    assert taken.read_text() == "the user's own log\n"
    # suffixes in any case name files, as .jsonl and .csv do
    model = Seq()
    with GradientMonitor(model, loggers=[tmp_path / "a.JSONL", tmp_path / "b.Csv"]) as mon:
        _train(model, 1, mon)
    assert (tmp_path / "a.JSONL").is_file() and (tmp_path / "b.Csv").is_file()
    assert len(read_jsonl(tmp_path / "a.JSONL")[0]) == 1


def test_step_on_an_unattached_monitor_says_so():
    model = Seq()
    mon = GradientMonitor(model)
    with pytest.warns(GradientFlowWarning, match="not attached.*attach\\(\\)"):
        _train(model, 1, mon)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every step
        _train(model, 1, mon)
    with GradientMonitor(model) as attached, warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, 1, attached)


# ----------------------------------------------------------------------------------------------
# what the gradients really were: retain_graph, gradient accumulation, no backward, checkpoints


def test_retain_graph_two_backwards_reports_the_summed_gradient():
    """Two backward calls through one graph before step(): .grad holds the sum, and so must
    every gradient statistic (input, state, parameter norms)."""
    torch.manual_seed(5)
    model = Seq(nn.LSTM, layers=1).double()
    x, y = _data(0)
    x, y = x.double(), y.double()
    with GradientMonitor(model, replay_every=1, max_batch=4) as mon:
        out = model(x)
        ((out - y) ** 2).mean().backward(retain_graph=True)
        (3.0 * (out[:, 4:] ** 2).sum()).backward()  # a different loss on the same graph
        rec = _json(mon.step())
    r = rec["layers"]["rnn"]
    # parameter statistics read .grad: the sum of both backwards
    want_global = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    assert rec["global_norm"] == pytest.approx(want_global, rel=1e-12)
    xr = x.clone().requires_grad_(True)
    o = model(xr)
    (gx,) = torch.autograd.grad(((o - y) ** 2).mean() + 3.0 * (o[:, 4:] ** 2).sum(), xr)
    torch.testing.assert_close(torch.tensor(r["input_grad"], dtype=torch.float64),
                               gx.norm(dim=-1).mean(0), rtol=1e-9, atol=1e-14)
    # state gradients of the summed objective, first max_batch samples
    out_r, _, _, states = reference_forward(model.rnn, x[:4])
    for h, c in states[0][0]:
        h.retain_grad()
        c.retain_grad()
    o4 = model.head(out_r)
    (((o4 - y[:4]) ** 2).sum() / y.numel() + 3.0 * (o4[:, 4:] ** 2).sum()).backward()
    got = r["state_grad"]["l0d0"]
    for which, k in (("h", 0), ("c", 1)):
        want = torch.stack([s[k].grad.norm(dim=-1).mean() for s in states[0][0]])
        torch.testing.assert_close(torch.tensor(got[which], dtype=torch.float64), want,
                                   rtol=1e-9, atol=1e-14)


def test_retain_graph_with_a_cell_loop_reports_the_summed_gradient():
    torch.manual_seed(6)
    cell = nn.GRUCell(5, 4).double()
    x, _ = _data(0)
    x = x.double()

    def unroll(inp):
        h, hs = None, []
        for t in range(inp.shape[1]):
            h = cell(inp[:, t], h)
            hs.append(h)
        return hs

    with GradientMonitor(cell, replay_every=1) as mon:
        hs = unroll(x)
        torch.stack(hs, 1).sum().backward(retain_graph=True)
        (hs[5] ** 2).sum().backward()
        rec = _json(mon.step())
    r = rec["layers"]["GRUCell"]
    xr = x.clone().requires_grad_(True)
    hs = unroll(xr)
    for h in hs:
        h.retain_grad()
    (torch.stack(hs, 1).sum() + (hs[5] ** 2).sum()).backward()
    torch.testing.assert_close(torch.tensor(r["input_grad"], dtype=torch.float64),
                               xr.grad.norm(dim=-1).mean(0))
    torch.testing.assert_close(torch.tensor(r["state_grad"]["l0d0"]["h"], dtype=torch.float64),
                               torch.stack([h.grad.norm(dim=-1).mean() for h in hs]))


def _step_with(extra, model_kind="fused"):
    """One monitored step (exact replay) of a fresh seeded model, with an `extra` call through
    the step's graph before loss.backward(); returns the Record's JSON form."""
    torch.manual_seed(5)
    x, y = _data(0)
    x, y = x.double(), y.double()
    xr = x.clone().requires_grad_(True)
    if model_kind == "fused":
        model = Seq(nn.LSTM, layers=1).double()
        forward = model
    else:  # a GRUCell loop: its statistics come from tensor hooks on every step
        model = nn.GRUCell(5, 4).double()

        def forward(inp):
            h, hs = None, []
            for t in range(inp.shape[1]):
                h = model(inp[:, t], h)
                hs.append(h)
            return torch.stack(hs, 1)
    with GradientMonitor(model, replay_every=1, max_batch=4,
                         alerts=AlertPolicy(warn=False)) as mon:
        out = forward(xr)
        loss = ((out[..., :1] - y) ** 2).mean() + (out[:, 3] ** 2).sum()
        if extra == "grad of the parameters":  # e.g. a gradient penalty's first half
            torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        elif extra == "grad of the input":  # e.g. a saliency map
            torch.autograd.grad(loss, xr, retain_graph=True)
        elif extra == "backward into the input only":
            loss.backward(inputs=[xr], retain_graph=True)
        loss.backward()
        return _json(mon.step())


@pytest.mark.parametrize("model_kind", ["fused", "cell"])
@pytest.mark.parametrize("extra", ["grad of the parameters", "grad of the input",
                                   "backward into the input only"])
def test_autograd_grad_through_the_graph_is_not_counted(extra, model_kind):
    """torch.autograd.grad through the step's graph, or a backward(inputs=...) that names no
    parameter, leaves every .grad alone: the statistics (input and exact state gradients,
    parameter norms) equal those of the same step without it, bit for bit."""
    plain = _step_with(None, model_kind)
    assert plain["layers"]  # a record with gradient statistics, not an empty one
    name = next(iter(plain["layers"]))
    assert plain["layers"][name]["input_grad"] is not None
    assert plain["layers"][name]["state_grad"]
    assert _step_with(extra, model_kind) == plain


def test_the_optimizer_backward_is_told_apart_inside_hooks():
    from rnnscope.monitor.optimizer_backward import OptimizerBackward, feeds_grad

    w = torch.randn(3, requires_grad=True)
    unused = torch.randn(3, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    y = w * x
    seen = []
    y.register_hook(lambda g: seen.append((feeds_grad([w]), feeds_grad([unused]),
                                           feeds_grad([unused, w]), feeds_grad([x.detach()]))))
    loss = y.sum()
    loss.backward(retain_graph=True)
    torch.autograd.grad(loss, w, retain_graph=True)
    torch.autograd.grad(loss, x, retain_graph=True)
    loss.backward(inputs=[x], retain_graph=True)
    loss.backward(inputs=[w])
    # (w, an unused parameter, either, no parameter that requires grad: every pass counts)
    assert seen == [(True, False, True, True), (False, False, False, True),
                    (False, False, False, True), (False, False, False, True),
                    (True, False, True, True)]
    asked = []
    gate = OptimizerBackward(lambda: asked.append(1) or [w])
    counted = []
    y2 = w * x
    for _ in range(3):  # three hooks in one pass: the parameters are asked once
        y2.register_hook(gate.only(lambda g: counted.append(1)))
    y2.sum().backward()
    assert counted == [1, 1, 1] and asked == [1]
    assert gate()  # outside a backward: nothing to tell, counted


@pytest.mark.parametrize("batch_first", [True, False])
def test_gradient_accumulation_pools_the_micro_batches(batch_first):
    """k micro-batches, each with its own forward and backward, then one step(): the record
    describes all their samples (the gradient of the summed objective w.r.t. each micro-batch's
    input is that micro-batch's own), micro-batches of different lengths included, and the
    exact replay takes max_batch samples over all of them."""
    torch.manual_seed(7)
    model = Seq(nn.LSTM, layers=1, batch_first=batch_first).double()
    g = torch.Generator().manual_seed(8)
    sizes, lengths = [3, 2, 4], [12, 9, 12]
    xs = [torch.randn(b, t, 5, generator=g, dtype=torch.float64) for b, t in zip(sizes, lengths)]
    ys = [torch.randn(b, t, 1, generator=g, dtype=torch.float64) for b, t in zip(sizes, lengths)]
    k = len(xs)
    with GradientMonitor(model, replay_every=1, max_batch=4) as mon:
        model.zero_grad()
        for x, y in zip(xs, ys):
            (((model(x) - y) ** 2).mean() / k).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientFlowWarning)  # nothing is skipped
            rec = _json(mon.step())
    r = rec["layers"]["rnn"]
    assert "skipped" not in rec
    sums, counts = torch.zeros(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    for x, y in zip(xs, ys):
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(((model(xr) - y) ** 2).mean() / k, xr)
        n = gx.norm(dim=-1)
        sums[:n.shape[1]] += n.sum(0)
        counts[:n.shape[1]] += n.shape[0]
    torch.testing.assert_close(torch.tensor(r["input_grad"], dtype=torch.float64),
                               sums / counts, rtol=1e-9, atol=1e-14)
    # exact path: the first 4 samples over the micro-batches = 3 of the first, 1 of the second
    # (whose 9 steps are pooled with the first 9 of the others)
    got = r["state_grad"]["l0d0"]
    assert len(got["h"]) == 12
    hs1, cs1 = _state_norms(model, xs[0][:3], ys[0][:3], 1 / k, xs[0].shape[0])
    hs2, cs2 = _state_norms(model, xs[1][:1], ys[1][:1], 1 / k, xs[1].shape[0])
    for which, (a, b) in (("h", (hs1, hs2)), ("c", (cs1, cs2))):
        s = a.sum(0)
        s[:b.shape[1]] += b.sum(0)
        cnt = torch.full((12,), 3.0, dtype=torch.float64)
        cnt[:b.shape[1]] += 1
        torch.testing.assert_close(torch.tensor(got[which], dtype=torch.float64), s / cnt,
                                   rtol=1e-9, atol=1e-14)
    model.zero_grad()
    for x, y in zip(xs, ys):
        (((model(x) - y) ** 2).mean() / k).backward()
    want_global = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    assert rec["global_norm"] == pytest.approx(want_global, rel=1e-12)


def _state_norms(model, x, y, weight, batch):
    """(n, T) ‖∂L/∂h_t‖, ‖∂L/∂c_t‖ of samples x of a micro-batch of `batch` samples whose loss
    is weight · mean squared error (each sample's share: its own terms over batch·T)."""
    out, _, _, states = reference_forward(model.rnn, x)
    for h, c in states[0][0]:
        h.retain_grad()
        c.retain_grad()
    T = x.shape[1]
    (weight * ((model.head(out) - y) ** 2).sum() / (batch * T)).backward()
    h = torch.stack([s[0].grad.norm(dim=-1) for s in states[0][0]], 1)
    c = torch.stack([s[1].grad.norm(dim=-1) for s in states[0][0]], 1)
    return h, c


def test_a_forward_without_backward_between_micro_batches_changes_nothing():
    """A grad-enabled forward that never gets a backward (a validation batch) inside the step
    is left out: the record equals the one without it, and holds no zeros for it."""
    def run(extra):
        torch.manual_seed(9)
        model = Seq(nn.GRU, layers=1).double()
        with GradientMonitor(model, replay_every=1, max_batch=8) as mon:
            for s in range(2):
                x, y = _data(s)
                (((model(x.double()) - y.double()) ** 2).mean()).backward()
                if extra and s == 0:
                    model(torch.randn(5, 20, 5, dtype=torch.float64))  # no backward
            return _json(mon.step())

    a, b = run(False), run(True)
    assert a["layers"] == b["layers"]
    assert len(a["layers"]["rnn"]["input_grad"]) == 12
    assert all(v > 0 for v in a["layers"]["rnn"]["state_grad"]["l0d0"]["h"])


def test_forward_without_backward_in_a_cell_loop_makes_no_record():
    cell = nn.LSTMCell(5, 4)
    with GradientMonitor(cell, replay_every=1) as mon:
        x, _ = _data(0)
        h = None
        with pytest.warns(GradientFlowWarning, match="no backward"):
            for t in range(x.shape[1]):
                h = cell(x[:, t], h)
            assert mon.step() is None
    assert len(mon.history) == 0


def test_checkpointed_recomputation_is_measured_once_and_equals_the_plain_run():
    """Non-reentrant checkpointing reruns the forward inside backward: the monitor must swap
    in the same leaf there (or torch raises CheckpointError), must not count the rerun as a
    second call, and must report what it reports without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    calls = []

    class Ckpt(Seq):
        def __init__(self, use_ckpt):
            super().__init__(nn.LSTM, layers=2)
            self.use_ckpt = use_ckpt

        def forward(self, x):
            def body(z):
                calls.append(1)
                return self.rnn(z)[0]
            out = checkpoint(body, x, use_reentrant=False) if self.use_ckpt else body(x)
            return self.head(out)

    def run(use_ckpt, monitor):
        torch.manual_seed(0)
        m = Ckpt(use_ckpt).double()
        mon = GradientMonitor(m, replay_every=1).attach() if monitor else None
        x, y = _data(0)
        ((m(x.double()) - y.double()) ** 2).mean().backward()
        rec = _json(mon.step()) if mon else None
        if mon:
            mon.close()
        return [p.grad.clone() for p in m.parameters()], rec

    calls.clear()
    g_ckpt_mon, rec_ckpt = run(True, True)
    assert len(calls) == 2  # the forward and its recomputation in backward
    g_plain, rec_plain = run(False, True)
    g_ckpt, _ = run(True, False)
    assert all(torch.equal(a, b) for a, b in zip(g_ckpt, g_ckpt_mon))
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_ckpt_mon))
    a, b = rec_ckpt["layers"]["rnn"], rec_plain["layers"]["rnn"]
    torch.testing.assert_close(torch.tensor(a["input_grad"]), torch.tensor(b["input_grad"]),
                               rtol=1e-12, atol=0)
    for key in ("l0d0", "l1d0"):
        for which in ("h", "c"):
            torch.testing.assert_close(torch.tensor(a["state_grad"][key][which]),
                                       torch.tensor(b["state_grad"][key][which]),
                                       rtol=1e-12, atol=0)
    assert "skipped" not in rec_ckpt


def test_a_failing_logger_is_paused_with_one_warning_and_training_goes_on():
    """A user's logger raising (or a disk filling up) never reaches the training loop."""
    from rnnscope.monitor.loggers import Logger

    class Broken(Logger):
        calls = 0

        def log(self, record):
            Broken.calls += 1
            raise OSError(28, "No space left on device")

        def log_alert(self, alert):
            pass

    torch.manual_seed(0)
    model = Seq()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, loggers=[Broken()]) as mon:
            _train(model, 3, mon)
    failed = [w for w in caught if "Broken failed at step" in str(w.message)]
    assert len(failed) == 1 and "No space left on device" in str(failed[0].message)
    assert Broken.calls == 1 and len(mon.history) == 3
