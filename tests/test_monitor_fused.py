"""The monitor's fused cheap path (monitor/grad_norms.py: one _foreach_norm over every gradient
block, norms in the gradients' dtype) gives the same record as the per-tensor float64 path."""

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
