"""The monitor on decay recurrences (monitor/decay_capture.py) against float64 autograd oracles:
the modules' own step loop (`step`) with every state's gradient retained."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rnnscope
from rnnscope.monitor import AlertPolicy, GradientFlowWarning, GradientMonitor

CLASSES = [rnnscope.LRU, rnnscope.MinGRU, rnnscope.MinLSTM, rnnscope.RGLRU,
           rnnscope.SelectiveSSM, rnnscope.SLSTM]
B, T, I, H = 3, 6, 4, 5


class Wrap(nn.Module):
    def __init__(self, cls, batch_first=True):
        super().__init__()
        self.rnn = cls(I, H, batch_first=batch_first)
        self.rnn.double()

    def forward(self, x):
        return self.rnn(x)


def _loss(out, hn, head):
    """A loss at every output step and on the last state (every h_n part for sLSTM)."""
    parts = hn if isinstance(hn, tuple) else (hn,)
    return (head(out).pow(2).sum()
            + sum(0.3 * (k + 1) * p.abs().pow(2).sum() for k, p in enumerate(parts)))


def _oracle(mod, x, head):
    """Per-step means over samples of ‖∂L/∂h_t‖, ‖∂L/∂c_t‖ (sLSTM), ‖∂L/∂x_t‖, ‖∂L/∂y_t‖ by
    autograd on the step loop."""
    x = x.detach().clone().requires_grad_(True)
    hs, cs = [], []
    if isinstance(mod, rnnscope.SLSTM):
        z = torch.zeros(B, H, dtype=x.dtype)
        state = (z, z, z, z)
        for x_t in x.unbind(1):
            state = mod.step(x_t, state)
            state[0].retain_grad()
            state[1].retain_grad()
            hs.append(state[0])
            cs.append(state[1])
        y = torch.stack(hs, 1)
        hn = tuple(p.unsqueeze(0) for p in state)
    else:
        state = mod._initial_state(None, B, False, x)
        for x_t in x.unbind(1):
            state = mod.step(x_t, state)
            state.retain_grad()
            hs.append(state)
        y = mod.readout(x, torch.stack(hs, 1))
        hn = state.unsqueeze(0)
    y.retain_grad()
    _loss(y, hn, head).backward()
    mean = lambda gs: [float(g.abs().reshape(B, -1).norm(dim=-1).mean()) for g in gs]  # noqa
    return {"h": mean([h.grad for h in hs]), "c": mean([c.grad for c in cs]) if cs else None,
            "x": mean(x.grad.unbind(1)), "y": mean(y.grad.unbind(1))}


@pytest.mark.parametrize("cls,batch_first",
                         [(c, True) for c in CLASSES] + [(rnnscope.MinGRU, False),
                                                        (rnnscope.LRU, False)],
                         ids=lambda v: v.__name__ if isinstance(v, type) else f"bf={v}")
def test_decay_monitor_matches_autograd_oracle(cls, batch_first):
    torch.manual_seed(0)
    model = Wrap(cls, batch_first)
    head = nn.Linear(model(torch.zeros(1, 1, I, dtype=torch.float64))[0].shape[-1], 2).double()
    x = torch.randn(B, T, I, dtype=torch.float64)  # batch-major; the module's layout below
    with GradientMonitor(model, every=1, replay_every=1, max_batch=B,
                         alerts=AlertPolicy(warn=False)) as mon:
        out, hn = model(x if batch_first else x.transpose(0, 1))
        out = out if batch_first else out.transpose(0, 1)
        _loss(out, hn, head).backward()
        rec = mon.step()
    grad_norms = {n: float(p.grad.norm()) for n, p in model.rnn.named_parameters()}
    want = _oracle(model.rnn, x, head)  # (its backward adds to .grad: read above)
    lay = rec.layers["rnn"]
    assert not rec.skipped
    sg = lay.state_grad[(0, 0)]
    torch.testing.assert_close(torch.tensor(sg.h), torch.tensor(want["h"]), rtol=1e-8, atol=1e-12)
    # a loss on the last state too: the gradient at early steps is not trivially the direct one
    assert max(want["h"]) > 0 and min(want["h"]) > 0
    if want["c"] is not None:
        torch.testing.assert_close(torch.tensor(sg.c), torch.tensor(want["c"]), rtol=1e-8,
                                   atol=1e-12)
    torch.testing.assert_close(torch.tensor(lay.input_grad.mean), torch.tensor(want["x"]),
                               rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(torch.tensor(lay.output_grad.mean), torch.tensor(want["y"]),
                               rtol=1e-8, atol=1e-12)
    # the decay statistics: per unit mean |a_t| over samples and steps
    xm = x if batch_first else x.transpose(0, 1)
    a = model.rnn.decay(xm) if model.rnn.linear_in_state else model.rnn.decay(xm, None)
    unit = a.detach().abs().reshape(B, T, -1).mean(dim=(0, 1))
    g = lay.gates[(0, 0)]
    assert g.gate == "|a|"
    assert g.mean == pytest.approx(float(unit.mean()), rel=1e-10)
    assert g.frac_units_hi == pytest.approx(float((unit > 0.99).double().mean()))
    assert g.memory_time_median == pytest.approx(float((1 / (1 - unit)).median()), rel=1e-10)
    # every parameter's gradient norm, whole (no gate blocks)
    assert set(lay.param_norms) == set(grad_norms)
    for pname, want_norm in grad_norms.items():
        assert lay.param_norms[pname][""] == pytest.approx(want_norm, rel=1e-12)
    # a loss at every step: the per-lag row is not given, and the record says why
    assert lay.output_lag_grad.by_lag is None and "decay" in lay.output_lag_grad.note
    assert not model.rnn._forward_hooks and not model.rnn._forward_pre_hooks


def test_lru_decay_statistics_closed_form():
    """|a| of the LRU is |λ| = exp(−exp(ν_log)) per unit, the same at every step."""
    torch.manual_seed(1)
    model = Wrap(rnnscope.LRU)
    x = torch.randn(B, T, I, dtype=torch.float64)
    with GradientMonitor(model, every=1, replay_every=1, alerts=AlertPolicy(warn=False)) as mon:
        model(x)[0].real.sum().backward()
        g = mon.step().layers["rnn"].gates[(0, 0)]
    lam = model.rnn.eigenvalues().detach().abs()
    assert g.mean == pytest.approx(float(lam.mean()), rel=1e-10)
    assert g.memory_time_median == pytest.approx(float((1 / (1 - lam)).median()), rel=1e-10)


def test_decay_monitor_record_roundtrips_and_leaves_model():
    torch.manual_seed(2)
    model = Wrap(rnnscope.MinGRU)
    x = torch.randn(B, T, I, dtype=torch.float64)
    bare = model(x)[0]
    with GradientMonitor(model, every=1, replay_every=1, alerts=AlertPolicy(warn=False)) as mon:
        out = model(x)[0]
        out.sum().backward()
        rec = mon.step()
    assert torch.equal(out, bare)
    back = type(rec).from_dict(rec.to_dict())
    assert back.layers["rnn"].output_grad == rec.layers["rnn"].output_grad
    assert back.layers["rnn"].gates == rec.layers["rnn"].gates
    assert math.isfinite(rec.layers["rnn"].gates[(0, 0)].mean)


class Leaky(nn.Module):
    """A third-party diagonal recurrence with nothing but the protocol (forward -> states)."""

    linear_in_state = True

    def __init__(self):
        super().__init__()
        self.w, self.inp = nn.Parameter(torch.zeros(4)), nn.Linear(3, 4)

    def decay(self, x):
        return torch.sigmoid(self.w).expand(x.shape[0], x.shape[1], 4)

    def hidden_states(self, x, hx=None):
        h, hs = torch.zeros(x.shape[0], 4), []
        for x_t in self.inp(x).unbind(1):
            h = torch.sigmoid(self.w) * h + x_t
            hs.append(h)
        return torch.stack(hs, 1)

    def forward(self, x):
        return self.hidden_states(x)


def test_protocol_module_without_gru_outputs_says_why():
    """A protocol module whose forward does not return (output, h_n): the cheap input profile
    and parameter norms are measured, the rest is named in `skipped`, never zeros."""
    torch.manual_seed(3)
    model = nn.Sequential(Leaky())
    x = torch.randn(2, 5, 3)
    with pytest.warns(GradientFlowWarning, match="not \\(output, h_n\\)"):
        with GradientMonitor(model, every=1, replay_every=1,
                             alerts=AlertPolicy(warn=False)) as mon:
            model(x).sum().backward()
            rec = mon.step()
    lay = rec.layers["0"]
    assert "not (output, h_n)" in rec.skipped["0"]
    assert lay.state_grad is None and lay.output_grad is None
    assert len(lay.input_grad.mean) == 5 and lay.param_norms["w"][""] > 0


@pytest.mark.parametrize("cls", [rnnscope.MinGRU, rnnscope.SLSTM], ids=lambda c: c.__name__)
def test_autograd_grad_through_the_graph_is_not_counted(cls):
    """A torch.autograd.grad call through the step's graph (a gradient penalty, a saliency
    map) reaches no .grad: the decay recurrence's statistics equal those of the plain step."""
    def step(extra: bool) -> dict:
        torch.manual_seed(0)
        model = Wrap(cls)
        head = nn.Linear(model(torch.zeros(1, 1, I, dtype=torch.float64))[0].shape[-1],
                         2).double()
        x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
        with GradientMonitor(model, every=1, replay_every=1, max_batch=B,
                             alerts=AlertPolicy(warn=False)) as mon:
            out, hn = model(x)
            loss = _loss(out, hn, head)
            if extra:
                torch.autograd.grad(loss, [x] + list(model.parameters()), retain_graph=True)
            loss.backward()
            return mon.step().to_dict()

    plain = step(False)
    assert plain["layers"]["rnn"]["input_grad"] is not None
    assert step(True) == plain
