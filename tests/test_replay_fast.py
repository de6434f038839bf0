"""The LSTM replay's closed-form autograd nodes, and direction 1 costing what direction 0 costs.

Oracles: torch.autograd.gradcheck (float64 finite differences), the plain-loop reference of
tests/reference.py, and counts of autograd nodes and of elements written by aten ops (not
timings).
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rnnscope
from rnnscope import cells
from rnnscope.recurrent import LayerParams
from reference import reference_forward


def _params(I, H, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
                    ).requires_grad_(True)
    return LayerParams(w_ih=r(4 * H, I), w_hh=r(4 * H, H), b_ih=r(4 * H) if bias else None,
                       b_hh=r(4 * H) if bias else None)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_layer_gradcheck(reverse, packed):
    """Every output the layer exposes (states in both orders, gates) against finite differences
    w.r.t. every input (x, h0, c0, all weights and biases)."""
    B, T, I, H = 3, 5, 2, 3
    p = _params(I, H)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, H, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4]) if packed else None

    def layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        lt = cells.lstm.run(LayerParams(w_ih, w_hh, b_ih, b_hh), x, h0, c0, reverse=reverse,
                            lengths=lengths)
        return (lt.h, lt.c, *lt.gates.values(), lt.steps_h[-1], lt.steps_c[-1])

    assert torch.autograd.gradcheck(layer, (x, h0, c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh))


def test_lstm_layer_gradcheck_without_bias_and_frozen_recurrent_weight():
    """W_hh not requiring grad skips the one-GEMM weight gradient; the rest stays exact."""
    B, T, I, H = 2, 4, 3, 2
    p = _params(I, H, bias=False, seed=3)
    w_hh = p.w_hh.detach()
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)

    def layer(x, h0, c0, w_ih):
        lt = cells.lstm.run(LayerParams(w_ih, w_hh, None, None), x, h0, c0, reverse=False)
        return lt.h, lt.c, lt.gates["o"]

    assert torch.autograd.gradcheck(layer, (x, h0, c0, p.w_ih))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_gradients_equal_the_reference_loop(bidirectional):
    """Parameter, input and initial-state gradients of a 2-layer replay equal those of the
    plain-loop reference, for a loss on the output and on the final states."""
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=bidirectional).double()
    D = 2 if bidirectional else 1
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * D, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2 * D, 2, 4, dtype=torch.float64, requires_grad=True)
    tr = rnnscope.replay(m, x, (h0, c0))
    out, h_n, c_n, _ = reference_forward(m, x, (h0, c0))
    torch.testing.assert_close(tr.output, out, rtol=0, atol=1e-12)
    w = [torch.randn_like(t) for t in (out, h_n, c_n)]
    leaves = [x, h0, c0, *m.parameters()]
    loss = lambda o, h, c: (o * w[0]).sum() + (h * w[1]).sum() + (c * w[2]).sum()  # noqa: E731
    got = torch.autograd.grad(loss(tr.output, tr.h_n, tr.c_n), leaves)
    want = torch.autograd.grad(loss(out, h_n, c_n), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_total_state_gradients_include_the_path_through_h():
    """∂L/∂c_t taken w.r.t. the c_t tensor is the total one (c_t also reaches L through
    h_t = o_t tanh c_t): equal to retain_grad on the reference loop."""
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    tr = rnnscope.replay(m, x)
    lt = tr.layers[0][0]
    grads = torch.autograd.grad(tr.output[:, -1].sum(), list(lt.steps_h) + list(lt.steps_c))
    _, _, _, states = reference_forward(m, x)
    flat = [s[0] for s in states[0][0]] + [s[1] for s in states[0][0]]
    for s in flat:
        s.retain_grad()
    torch.stack([s[0] for s in states[0][0]], 1)[:, -1].sum().backward()
    for a, s in zip(grads, flat):
        torch.testing.assert_close(a, s.grad, rtol=1e-10, atol=1e-14)


def test_graph_and_no_graph_replays_are_bit_identical():
    """The closed-form nodes run the same forward operations as the graph-less replay."""
    torch.manual_seed(0)
    m = nn.LSTM(5, 6, num_layers=2, bidirectional=True)
    x = torch.randn(3, 11, 5)
    tr = rnnscope.replay(m, x)
    with torch.no_grad():
        ref = rnnscope.replay(m, x)
    assert torch.equal(tr.output, ref.output) and torch.equal(tr.c_n, ref.c_n)
    for a, b in zip(tr.layers[1], ref.layers[1]):
        assert torch.equal(a.c, b.c)
        assert all(torch.equal(a.gates[k], b.gates[k]) for k in "ifgo")


def test_double_backward_is_refused_loudly():
    m = nn.LSTM(2, 3).double()
    x = torch.randn(4, 1, 2, dtype=torch.float64, requires_grad=True)
    out = rnnscope.replay(m, x).output.sum()
    with pytest.raises(RuntimeError, match="create_graph=True.*nn.LSTMCell"):
        torch.autograd.grad(out, x, create_graph=True)


def _graph_nodes(t: torch.Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


def test_lstm_replay_records_two_nodes_per_step():
    """About ten autograd nodes per step made the backward slow; the replay now records two
    (c' and gates; h'), plus a constant number per layer."""
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, batch_first=True)
    counts = [_graph_nodes(rnnscope.replay(m, torch.randn(2, T, 3)).output) for T in (10, 30)]
    assert counts[1] - counts[0] == 2 * 20


class _Written(TorchDispatchMode):
    """Counts the elements every aten op writes (its outputs' numel), and those of flips."""

    def __init__(self):
        super().__init__()
        self.total = self.flip = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        n = sum(o.numel() for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor))
        self.total += n
        if func.overloadpacket is torch.ops.aten.flip:
            self.flip += n
        return out


@pytest.mark.parametrize("fused", [nn.LSTM, nn.GRU, nn.RNN])
def test_direction_1_does_the_work_of_direction_0(fused):
    """Per-chunk flips of the whole sequence made direction-1 sweeps O(T²): the elements written
    by every op of cell_jacobians must be about those of direction 0, and the flips linear."""
    torch.manual_seed(0)
    m = fused(2, 3, batch_first=True, bidirectional=True).double()
    work = {}
    for T in (64, 256):
        x = torch.randn(2, T, 2, dtype=torch.float64)
        for d in (0, 1):
            with _Written() as w:
                rnnscope.cell_jacobians(m, x, direction=d, keep="norms")
            work[T, d] = (w.total, w.flip)
    for T in (64, 256):
        assert work[T, 1][0] <= 1.1 * work[T, 0][0], work
    assert work[256, 1][1] <= 4.5 * work[64, 1][1], work  # flips grow linearly with T


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_reverse_layer_run_writes_what_forward_writes(kind):
    """The replay runs direction 1 on the same unbound steps, taken in reverse: the forward and
    backward of a reverse layer write the same number of elements as a forward one."""
    B, T, I, H = 2, 50, 3, 4
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    g = torch.Generator().manual_seed(0)
    p = LayerParams(*(torch.randn(*s, generator=g).requires_grad_(True)
                      for s in ((G * H, I), (G * H, H), (G * H,), (G * H,))))
    x = torch.randn(B, T, I, generator=g, requires_grad=True)
    h0 = torch.zeros(B, H)
    written = []
    for reverse in (False, True):
        for t in (p.w_ih, p.w_hh, p.b_ih, p.b_hh, x):  # each run starts without .grad:
            t.grad = None  # accumulating into one is not the layer's work
        with _Written() as w:
            if kind == "lstm":
                lt = cells.lstm.run(p, x, h0, torch.zeros(B, H), reverse=reverse)
            else:
                lt = getattr(cells, kind).run(p, x, h0, reverse=reverse)
            lt.h.sum().backward()
        written.append(w.total)
    assert written[0] == written[1]


def test_recurrent_weight_gradient_is_computed_only_when_asked_for(monkeypatch):
    """W_hh's gradient (one GEMM over all steps) is skipped by a backward that asks for other
    tensors only (autograd.grad w.r.t. the input, as compare's profile does), and computed,
    equal to the fused module's, when the backward reaches W_hh."""
    from rnnscope.cells import lstm as lstm_cell

    calls = []
    real = lstm_cell._PrevStates.in_positions
    monkeypatch.setattr(lstm_cell._PrevStates, "in_positions",
                        lambda self: calls.append(1) or real(self))
    torch.manual_seed(0)
    m = nn.LSTM(3, 5, num_layers=2, batch_first=True).double()
    x = torch.randn(4, 9, 3, dtype=torch.float64, requires_grad=True)
    tr = rnnscope.replay(m, x)
    (gx,) = torch.autograd.grad(tr.output[:, -1].sum(), [x], retain_graph=True)
    assert calls == []
    xf = x.detach().requires_grad_(True)
    m(xf)[0][:, -1].sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    torch.testing.assert_close(gx, xf.grad, rtol=1e-12, atol=1e-14)
    g_w = torch.autograd.grad(tr.output[:, -1].sum(), [x, m.weight_hh_l0], retain_graph=True)
    assert len(calls) == 1  # layer 0's W_hh only: layer 1's is not asked for
    torch.testing.assert_close(g_w[1], want["weight_hh_l0"], rtol=1e-12, atol=1e-14)
    m.zero_grad(set_to_none=True)
    calls.clear()
    tr.output[:, -1].sum().backward()
    assert len(calls) == 2
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-14)
