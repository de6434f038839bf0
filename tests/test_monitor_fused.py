"""The monitor's fused cheap path (monitor/grad_norms.py: one vector_norm per gradient over its
gate blocks, norms in the gradients' dtype) gives the same record as the per-tensor float64 path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rnnscope.monitor import AlertPolicy, GradientMonitor
from rnnscope.monitor import grad_norms


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, proj_size=5)
        self.gru = nn.GRU(5, 7, batch_first=True)
        self.cell = nn.LSTMCell(7, 4)
        self.fc = nn.Linear(4, 11)

    def forward(self, x):
        y = self.gru(self.lstm(self.embed(x))[0])[0]
        h = c = torch.zeros(x.shape[0], 4)
        outs = []
        for y_t in y.unbind(1):
            h, c = self.cell(y_t, (h, c))
            outs.append(h)
        return self.fc(torch.stack(outs, 1))  # (B, T, V)


def _records(scale: float, monkeypatch):
    torch.manual_seed(0)
    model = Net()
    x = torch.randint(0, 11, (3, 9))
    with GradientMonitor(model, every=1, replay_every=0, alerts=AlertPolicy(warn=False)) as mon:
        logits = model(x)
        (scale * nn.functional.cross_entropy(logits.reshape(-1, 11),
                                             x.reshape(-1))).backward()
        fused = mon._measure(True, False)
        monkeypatch.setattr(grad_norms, "FUSED", False)
        per_tensor = mon._measure(True, False)
        monkeypatch.setattr(grad_norms, "FUSED", True)
    return model, fused, per_tensor


def _flat(rec) -> dict:
    from rnnscope.monitor.statistics import flat_scalars

    out = dict(flat_scalars(rec))
    for name, lay in rec.layers.items():
        for t, v in enumerate(lay.input_grad.mean):
            out[f"{name}/input_grad/{t}"] = v
    return out


@pytest.mark.parametrize("scale,rtol", [(1.0, 1e-5), (1e-30, 1e-12), (1e25, 1e-12)],
                         ids=["usual", "vanishing", "exploding"])
def test_fused_record_equals_per_tensor_record(scale, rtol, monkeypatch):
    """Usual gradients: equal to float32 rounding. Tiny or huge ones (where a float32 sum of
    squares under/overflows): the fused path recomputes in float64, so equal to float64."""
    model, fused, per_tensor = _records(scale, monkeypatch)
    a, b = _flat(fused), _flat(per_tensor)
    assert set(a) == set(b) and len(a) > 40
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rtol, abs=0), k
    # and against the gradients themselves, per gate block, in float64
    lstm = fused.layers["lstm"].param_norms
    g = model.lstm.weight_hh_l1.grad.double().reshape(4, -1).norm(dim=1)
    for gate, want in zip("ifgo", g.tolist()):
        assert lstm["weight_hh_l1"][gate] == pytest.approx(want, rel=rtol)
    assert lstm["weight_hr_l0"][""] == pytest.approx(
        float(model.lstm.weight_hr_l0.grad.double().norm()), rel=rtol)
    total = math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in model.parameters()))
    assert fused.global_norm == pytest.approx(total, rel=rtol)
    assert math.isfinite(fused.global_norm) and fused.global_norm > 0


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_norms_of_huge_and_tiny_float64_gradients_are_exact_and_nan_stays_nan(scale):
    """A float64 model whose gradients are ~1e±200: the gate blocks' norms, the global norm and
    the per-step input-gradient norms equal a scaled float64 reference (a sum of squares
    overflows to inf past ~1e154 and underflows to 0 below ~1e-154); a NaN block makes its
    parameter's norm NaN even next to an infinite block."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    with GradientMonitor(lstm, every=1, replay_every=0, alerts=AlertPolicy(warn=False)) as mon:
        x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
        out, _ = lstm(x)
        (out.sum() * scale).backward()
        rec = mon.step()
    grads = [p.grad for p in lstm.parameters()]

    def scaled_norm(ts):
        return scale * float(torch.linalg.vector_norm(torch.cat([t.flatten() / scale
                                                                 for t in ts])))
    assert math.isfinite(rec.global_norm) and rec.global_norm > scale / 10
    assert rec.global_norm == pytest.approx(scaled_norm(grads), rel=1e-12)
    w = lstm.weight_hh_l0.grad
    for k, gate in enumerate("ifgo"):
        got = rec.layers["LSTM"].param_norms["weight_hh_l0"][gate]
        assert got == pytest.approx(scaled_norm([w[4 * k: 4 * k + 4]]), rel=1e-12)
    want_rows = (x.grad / scale).norm(dim=-1).mean(0) * scale  # (T,) batch mean
    got_rows = torch.tensor(rec.layers["LSTM"].input_grad.mean, dtype=torch.float64)
    torch.testing.assert_close(got_rows, want_rows, rtol=1e-12, atol=0)
    assert grad_norms.norm_of_norms([math.inf, math.nan]) != grad_norms.norm_of_norms([1.0])
    assert math.isnan(grad_norms.norm_of_norms([math.inf, math.nan, 1.0]))
    assert grad_norms.norm_of_norms([math.inf, 2.0]) == math.inf
    assert grad_norms.norm_of_norms([3e300, 4e300]) == pytest.approx(5e300, rel=1e-15)


def test_parameters_added_or_replaced_after_a_step_are_measured():
    """The monitor keeps a plan of the model's parameters (names, gate blocks) between steps:
    a parameter registered later, or one replaced by a new tensor, is in the next record."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.GRU(3, 4, batch_first=True), "head": nn.Linear(4, 2)})

    def step(mon):
        x = torch.randn(2, 5, 3)
        out = model["head"](model["rnn"](x)[0])
        loss = out.square().sum() + sum(p.sum() for n, p in model.named_parameters()
                                        if n.startswith("extra"))
        model.zero_grad()
        loss.backward()
        return mon.step()

    with GradientMonitor(model, every=1, replay_every=0, alerts=AlertPolicy(warn=False)) as mon:
        step(mon)
        model.register_parameter("extra", nn.Parameter(torch.full((3,), 2.0)))
        model["rnn"].weight_hh_l0 = nn.Parameter(model["rnn"].weight_hh_l0.detach() * 2)
        rec = step(mon)
    total = math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in model.parameters()))
    assert rec.global_norm == pytest.approx(total, rel=1e-6)
    w = model["rnn"].weight_hh_l0.grad.double().reshape(3, -1).norm(dim=1)
    got = rec.layers["rnn"].param_norms["weight_hh_l0"]
    assert [got[g] for g in "rzn"] == pytest.approx(w.tolist(), rel=1e-6)
