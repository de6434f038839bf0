"""Replay of real-world inputs and modules: packed sequences, training-mode inter-layer dropout
and subclasses of PyTorch's recurrent modules. Each is checked against the fused module and the
independent per-sample loop in reference.py."""

import abc
import warnings
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

import rnnscope
from reference import KINDS, fused_layer_by_layer, reference_forward_lengths
from rnnscope import recurrent
from rnnscope.replay import check_replayable

warnings.filterwarnings("ignore", message="dropout option adds dropout after all but last")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _hx(kind, L, D, B, P, H, dtype, gen=None):
    h = torch.randn(L * D, B, P, dtype=dtype, generator=gen)
    return (h, torch.randn(L * D, B, H, dtype=dtype, generator=gen)) if kind == "lstm" else h


def _unpack(kind, res):
    out, hx = res
    return (out, hx[0], hx[1]) if kind == "lstm" else (out, hx, None)


def _close(a, b, tol):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol


def _same_packing(a: PackedSequence, b: PackedSequence):
    assert torch.equal(a.batch_sizes, b.batch_sizes)
    for x, y in ((a.sorted_indices, b.sorted_indices), (a.unsorted_indices, b.unsorted_indices)):
        assert (x is None and y is None) or torch.equal(x, y)


# ---------------------------------------------------------------- packed sequences

@st.composite
def packed_configs(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    cfg = dict(input_size=draw(st.integers(1, 4)), hidden_size=draw(st.integers(2, 5)),
               num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
               batch_first=draw(st.booleans()), bias=draw(st.booleans()))
    if kind == "lstm" and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, cfg["hidden_size"] - 1))
    B = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 6), min_size=B, max_size=B))
    extra = draw(st.integers(0, 2))  # padded T larger than the longest length
    return dict(kind=kind, cfg=cfg, lengths=lengths, extra=extra,
                enforce_sorted=draw(st.booleans()), with_hx=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                seed=draw(st.integers(0, 2**16)))


def _packed_case(c):
    torch.manual_seed(c["seed"])
    kind, cfg, dtype = c["kind"], c["cfg"], c["dtype"]
    m = KINDS[kind](**cfg).to(dtype)
    lengths = list(c["lengths"])
    if c["enforce_sorted"]:
        lengths = sorted(lengths, reverse=True)
    B, T = len(lengths), max(lengths) + c["extra"]
    x = torch.randn(B, T, cfg["input_size"], dtype=dtype, requires_grad=True)
    L, D = cfg["num_layers"], 2 if cfg["bidirectional"] else 1
    H = cfg["hidden_size"]
    P = cfg.get("proj_size", 0) or H
    hx = _hx(kind, L, D, B, P, H, dtype) if c["with_hx"] else None
    xin = x if cfg["batch_first"] else x.transpose(0, 1)
    packed = pack_padded_sequence(xin, torch.tensor(lengths), batch_first=cfg["batch_first"],
                                  enforce_sorted=c["enforce_sorted"])
    return m, x, packed, hx, lengths


@given(packed_configs())
def test_packed_equals_module_reference_and_gradients(c):
    m, x, packed, hx, lengths = _packed_case(c)
    kind, dtype = c["kind"], c["dtype"]
    tol = TOL[dtype]
    out, h_n, c_n = _unpack(kind, m(packed, hx))
    tr = rnnscope.replay(m, packed, hx)

    assert isinstance(tr.output, PackedSequence) and tr.packed
    _same_packing(tr.output, out)
    _close(tr.output.data, out.data, tol)
    _close(tr.h_n, h_n, tol)
    if kind == "lstm":
        _close(tr.c_n, c_n, tol)
    else:
        assert tr.c_n is None
    assert tr.lengths.dtype == torch.int64 and tr.lengths.device.type == "cpu"
    assert tr.lengths.tolist() == lengths
    for dirs in tr.layers:
        for lt in dirs:
            assert torch.equal(lt.lengths, tr.lengths)
            assert lt.valid.shape == (len(lengths), max(lengths))

    # the independent per-sample loop (float64 reference on float64 copies)
    if dtype == torch.float64:
        ref_out, ref_h, ref_c = reference_forward_lengths(m, x.detach(), lengths, hx)
        padded = torch.zeros_like(ref_out[:, :max(lengths)])
        rows = _rows(tr.output, max(lengths))
        padded.view(-1, padded.shape[-1])[rows] = tr.output.data.detach()
        _close(padded, ref_out[:, :max(lengths)], 1e-12)
        _close(tr.h_n, ref_h, 1e-12)
        if kind == "lstm":
            _close(tr.c_n, ref_c, 1e-12)

    # gradients w.r.t. packed.data and every parameter equal the fused module's
    ws = [torch.randn_like(t) for t in (out.data, h_n, c_n) if t is not None]

    def loss(o, h, cc):
        return sum((t * w).sum() for t, w in zip([t for t in (o, h, cc) if t is not None], ws))

    wrt = [packed.data] + list(m.parameters())
    g_mod = torch.autograd.grad(loss(out.data, h_n, c_n), wrt)
    g_rep = torch.autograd.grad(loss(tr.output.data, tr.h_n, tr.c_n), wrt)
    for a, b in zip(g_rep, g_mod):
        assert (a - b).abs().max().item() <= GTOL[dtype] * (1 + b.abs().max().item())


def _rows(packed, T):
    """Flat b·T + t (original batch order) of each packed row."""
    order = (torch.arange(int(packed.batch_sizes[0])) if packed.sorted_indices is None
             else packed.sorted_indices)
    rows = []
    for t, bs in enumerate(packed.batch_sizes.tolist()):
        rows += [int(order[j]) * T + t for j in range(bs)]
    return torch.tensor(rows)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_packed_special_batches(kind):
    torch.manual_seed(3)
    m = KINDS[kind](input_size=3, hidden_size=4, num_layers=2, bidirectional=True,
                    batch_first=True).double()
    cases = {
        "unsorted, equal lengths": pack_padded_sequence(
            torch.randn(3, 5, 3, dtype=torch.float64), torch.tensor([5, 5, 5]),
            batch_first=True, enforce_sorted=False),
        "batch of one": pack_padded_sequence(torch.randn(1, 4, 3, dtype=torch.float64),
                                             torch.tensor([4]), batch_first=True),
        "max length < padded T": pack_padded_sequence(
            torch.randn(3, 9, 3, dtype=torch.float64), torch.tensor([2, 6, 4]),
            batch_first=True, enforce_sorted=False),
        "pack_sequence": pack_sequence([torch.randn(n, 3, dtype=torch.float64)
                                        for n in (2, 5, 1, 5)], enforce_sorted=False),
    }
    for name, packed in cases.items():
        out, h_n, _ = _unpack(kind, m(packed))
        tr = rnnscope.replay(m, packed)
        _same_packing(tr.output, out)
        _close(tr.output.data, out.data, 1e-12)
        _close(tr.h_n, h_n, 1e-12)
        T = len(packed.batch_sizes)
        assert tr.layers[0][0].h.shape[:2] == (int(packed.batch_sizes[0]), T), name


def test_packed_padding_semantics():
    """Padded positions: zero layer output; carried state (direction 0: the state at len-1,
    direction 1: h0); the reverse direction starts at len-1 from h0."""
    torch.manual_seed(4)
    m = nn.GRU(2, 3, num_layers=2, bidirectional=True).double()
    seqs = [torch.randn(n, 2, dtype=torch.float64) for n in (4, 2)]
    hx = torch.randn(4, 2, 3, dtype=torch.float64)
    tr = rnnscope.replay(m, pack_sequence(seqs), hx)
    fw, bw = tr.layers[0]
    assert torch.equal(fw.h[1, 2], fw.h[1, 1]) and torch.equal(fw.h[1, 3], fw.h[1, 1])
    assert torch.equal(bw.h[1, 2], hx[1, 1]) and torch.equal(bw.h[1, 3], hx[1, 1])
    assert torch.equal(tr.layers[1][0].x[1, 2:], torch.zeros(2, 6, dtype=torch.float64))
    assert fw.valid.tolist() == [[True] * 4, [True, True, False, False]]
    # direction 1 of sample 1 alone, from position 1 down to 0, equals the packed replay
    alone = rnnscope.replay(m, seqs[1].unsqueeze(1), hx[:, 1:2])
    assert torch.allclose(alone.layers[0][1].h[0], bw.h[1, :2], atol=1e-14)
    assert torch.allclose(alone.h_n[:, 0], tr.h_n[:, 1], atol=1e-14)
    assert set(fw.gates) == {"r", "z", "n"} and fw.gates["z"].shape == (2, 4, 3)


def test_unpacked_inputs_have_no_lengths():
    m = nn.LSTM(3, 4)
    tr = rnnscope.replay(m, torch.randn(5, 2, 3))
    assert tr.lengths is None and not tr.packed and tr.dropout_masks == ()
    assert tr.layers[0][0].lengths is None and tr.layers[0][0].valid is None


def test_packed_errors():
    packed = pack_sequence([torch.randn(3, 3), torch.randn(2, 3)])
    with pytest.raises(TypeError, match="cannot take a PackedSequence"):
        rnnscope.replay(nn.GRUCell(3, 4), packed)
    with pytest.raises(ValueError, match=r"\(N, I=5\)"):
        rnnscope.replay(nn.GRU(5, 4), packed)
    with pytest.raises(TypeError, match="float32.*float64"):
        rnnscope.replay(nn.GRU(3, 4).double(), packed)
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 2, 4\)"):
        rnnscope.replay(nn.GRU(3, 4), packed, torch.zeros(1, 3, 4))


# ---------------------------------------------------------------- inter-layer dropout

DROPOUT_CASES = [(kind, L, bidir, bf, packed)
                 for kind in ("lstm", "gru", "rnn_tanh")
                 for L in (2, 3) for bidir in (False, True) for bf in (False, True)
                 for packed in (False, True)
                 if not (packed and bf and L == 3)]  # trims the grid; every axis still covered


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind, L, bidir, batch_first, packed", DROPOUT_CASES)
def test_dropout_masks_are_redrawn_bit_for_bit(kind, L, bidir, batch_first, packed, dtype):
    torch.manual_seed(zlib.crc32(repr((kind, L, bidir, batch_first, packed)).encode()))
    m = KINDS[kind](input_size=3, hidden_size=4, num_layers=L, bidirectional=bidir,
                    batch_first=batch_first,
                    dropout=0.45).to(dtype)
    B, T = 3, 5
    x = torch.randn(B, T, 3, dtype=dtype)
    lengths = [5, 2, 4] if packed else [T] * B
    inputs = x if batch_first else x.transpose(0, 1)
    if packed:
        inputs = pack_padded_sequence(inputs, torch.tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=False)
    D = 2 if bidir else 1
    hx = _hx(kind, L, D, B, 4, 4, dtype)

    state = torch.get_rng_state()
    out, h_n, c_n = _unpack(kind, m(inputs, hx))
    after = torch.get_rng_state()
    assert not torch.equal(state, after)  # the kernel did draw masks
    tr = rnnscope.replay(m, inputs, hx, rng_state=state)
    assert torch.equal(torch.get_rng_state(), after)  # the replay never touches the global RNG

    assert len(tr.dropout_masks) == L - 1
    kept = torch.ones((), dtype=dtype).div(1 - 0.45)
    for mask in tr.dropout_masks:
        assert mask.shape == (B, T, D * 4)
        valid = torch.arange(T)[None, :, None] < torch.tensor(lengths)[:, None, None]
        assert ((mask == 0) | (mask == kept)).all() and (mask[~valid.expand_as(mask)] == 0).all()
        assert 0 < (mask == 0).sum() < mask.numel()
    # the masks are the kernel's own: the fused layers chained with them give the fused output
    # bit for bit
    chained = fused_layer_by_layer(m, inputs, hx, tr.dropout_masks)
    o, ch = (out.data, chained.data) if packed else (out, chained)
    assert torch.equal(ch, o)
    # the replay (different op order inside a step) is within a few ulps of the fused output
    got = tr.output.data if packed else tr.output
    eps = torch.finfo(dtype).eps
    assert (got - o).abs().max().item() <= 8 * eps * (1 + o.abs().max().item())
    _close(tr.h_n, h_n, TOL[dtype])
    if kind == "lstm":
        _close(tr.c_n, c_n, TOL[dtype])
    # and the independent loop with the same masks agrees (float64)
    if dtype == torch.float64:
        ref_out, ref_h, _ = reference_forward_lengths(m, x, lengths, hx, list(tr.dropout_masks))
        padded = ref_out if not packed else ref_out.reshape(B * T, -1)[_rows(tr.output, T)]
        mine = tr.output.data if packed else (tr.output if batch_first
                                              else tr.output.transpose(0, 1))
        _close(mine, padded, 1e-12)
        _close(tr.h_n, ref_h, 1e-12)


@pytest.mark.parametrize("kind, bidir, batch_first", [("lstm", False, True), ("gru", True, False),
                                                    ("rnn_tanh", False, False)])
def test_replay_leading_samples_equals_the_whole_batch_replay_narrowed(kind, bidir, batch_first):
    """The first n samples of a training-mode dropout call, replayed with masks drawn for the
    whole batch, are the whole batch's replay narrowed to them: the masks bit for bit, states,
    gates and output to float64 rounding (a GEMM over fewer rows may round differently); the
    global generator is not touched."""
    from rnnscope.replay import replay_leading_samples

    torch.manual_seed(zlib.crc32(repr((kind, bidir, batch_first)).encode()))
    m = KINDS[kind](input_size=3, hidden_size=4, num_layers=3, bidirectional=bidir,
                    batch_first=batch_first, dropout=0.4).double()
    B, T, n, D = 5, 6, 2, 2 if bidir else 1
    x = torch.randn(B, T, 3, dtype=torch.float64)
    inputs = x if batch_first else x.transpose(0, 1)
    hx = _hx(kind, 3, D, B, 4, 4, torch.float64)
    state = torch.get_rng_state()
    m(inputs, hx)
    after = torch.get_rng_state()
    whole = rnnscope.replay(m, inputs, hx, rng_state=state)
    head = replay_leading_samples(m, inputs.narrow(1 - int(batch_first), 0, n),
                                  tuple(h[:, :n] for h in hx) if kind == "lstm" else hx[:, :n],
                                  rng_state=state, batch=B)
    assert torch.equal(torch.get_rng_state(), after)
    for a, b in zip(head.dropout_masks, whole.dropout_masks):
        assert torch.equal(a, b[:n])
    _close(head.output, whole.output.narrow(1 - int(batch_first), 0, n), 1e-13)
    for la, lb in zip(head.layers, whole.layers):
        for ta, tb in zip(la, lb):
            _close(ta.h, tb.h[:n], 1e-13)
            assert set(ta.gates) == set(tb.gates)
            for g in ta.gates:
                _close(ta.gates[g], tb.gates[g][:n], 1e-13)
    with pytest.raises(ValueError, match="batch=1 is smaller than the 2 samples"):
        replay_leading_samples(m, inputs.narrow(1 - int(batch_first), 0, n), None,
                               rng_state=state, batch=1)


def test_replay_leading_samples_refuses_a_packed_sequence():
    from rnnscope.replay import replay_leading_samples

    m = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    packed = pack_sequence([torch.randn(4, 3), torch.randn(2, 3)])
    with pytest.raises(TypeError, match="takes a tensor input"):
        replay_leading_samples(m, packed, rng_state=torch.get_rng_state(), batch=2)


def test_dropout_gradients_match_the_fused_module():
    torch.manual_seed(5)
    m = nn.LSTM(3, 4, num_layers=3, dropout=0.3, bidirectional=True).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    out, (h, c) = m(x)
    tr = rnnscope.replay(m, x, rng_state=state)
    w = torch.randn_like(out)
    wrt = [x] + list(m.parameters())
    g_mod = torch.autograd.grad((out * w).sum() + h.sum() + c.sum(), wrt)
    g_rep = torch.autograd.grad((tr.output * w).sum() + tr.h_n.sum() + tr.c_n.sum(), wrt)
    for a, b in zip(g_rep, g_mod):
        assert (a - b).abs().max().item() <= 1e-12


def test_dropout_one_and_eval_mode():
    torch.manual_seed(6)
    m = nn.GRU(3, 4, num_layers=2, dropout=1.0).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    state = torch.get_rng_state()
    out, _ = m(x)
    assert torch.equal(state, torch.get_rng_state())  # p = 1 draws nothing: zeros
    tr = rnnscope.replay(m, x, rng_state=state)
    assert torch.equal(tr.dropout_masks[0], torch.zeros(2, 5, 4, dtype=torch.float64))
    _close(tr.output, out, 1e-12)
    m.eval()  # no dropout in eval mode: rng_state is not needed, and ignored if given
    assert rnnscope.replay(m, x, rng_state=state).dropout_masks == ()


def test_dropout_refusals():
    m = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"rng_state=torch\.get_rng_state\(\).*module\.eval\(\)"):
        rnnscope.replay(m, x)
    # an analysis that replays internally takes no rng_state: it says to replay and pass the
    # trace, and doing so works
    for fn in (rnnscope.state_gradients, rnnscope.cell_jacobians, rnnscope.gate_stats):
        with pytest.raises(ValueError, match=rf"{fn.__name__} takes no rng_state: replay it "
                           rf"yourself.*rng_state=state.*\({fn.__name__}\(trace\)\)"):
            fn(m, x)
    state = torch.get_rng_state()
    m(x)
    assert rnnscope.state_gradients(rnnscope.replay(m, x, rng_state=state)).layers
    spec = recurrent.describe(m)
    with pytest.raises(ValueError, match="cuDNN.*private dropout state.*eval"):
        check_replayable(spec, device="cuda", rng_state=torch.get_rng_state())
    with pytest.raises(TypeError, match="torch.get_rng_state"):
        rnnscope.replay(m, x, rng_state=torch.zeros(3))
    with pytest.raises(ValueError, match="not a CPU generator state"):
        rnnscope.replay(m, x, rng_state=torch.zeros(3, dtype=torch.uint8))
    mixed = nn.GRU(3, 4)
    mixed.weight_hh_l0.data = mixed.weight_hh_l0.data.double()
    with pytest.raises(TypeError, match="mixed dtypes"):
        rnnscope.replay(mixed, x)


# ---------------------------------------------------------------- subclasses

class PlainLSTM(nn.LSTM):
    """Adds an attribute only."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.note = "mine"


class PlusOneLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        out, state = super().forward(x, hx)
        return out + 1, state


class _ZeroLengthRNN(abc.ABC, nn.RNNBase):
    """Shaped like forecasting libraries' RNNs: an abstract base on nn.RNNBase whose forward
    takes optional lengths (for zero-length sequences) and otherwise calls super().forward."""

    @abc.abstractmethod
    def initial_state(self, x): ...

    def forward(self, x, hx=None, lengths=None, enforce_sorted=True):
        if lengths is None:
            return super().forward(x, hx=hx)
        keep = lengths.clamp_min(1)
        packed = pack_padded_sequence(x, keep.cpu(), batch_first=self.batch_first,
                                      enforce_sorted=enforce_sorted)
        return super().forward(packed, hx=hx)


class ZeroLengthGRU(_ZeroLengthRNN, nn.GRU):
    def initial_state(self, x):
        return None


class FailingGRU(nn.GRU):
    def forward(self, x, lengths):
        return super().forward(x)


class OutputOnlyGRU(nn.GRU):
    def forward(self, x, hx=None):
        return super().forward(x, hx)[0]


class HalfCell(nn.GRUCell):
    def forward(self, x, hx=None):
        return super().forward(x, hx) * 0.5


class QuietCell(nn.LSTMCell):
    pass


class DirectRNNBase(nn.RNNBase):
    pass


def test_subclasses_that_compute_the_parent_are_replayed(untouched):
    snapshot, assert_untouched = untouched
    torch.manual_seed(7)
    for m in (PlainLSTM(3, 4, num_layers=2, batch_first=True),
              ZeroLengthGRU(3, 4, bidirectional=True, batch_first=True)):
        assert recurrent.is_recurrent(m)
        spec = recurrent.describe(m)
        assert spec.num_layers == m.num_layers and spec.batch_first
        x = torch.randn(2, 5, 3)
        before = snapshot(m)
        tr = rnnscope.replay(m, x)
        assert_untouched(m, before)
        out = m(x)[0]
        _close(tr.output, out, 1e-5)
        # also packed input through the subclass's own packing path
        lengths = torch.tensor([5, 3])
        _close(rnnscope.replay(m, pack_padded_sequence(x, lengths, batch_first=True)).output.data,
               m(pack_padded_sequence(x, lengths, batch_first=True))[0].data, 1e-5)
    cell = QuietCell(3, 4)
    tr = rnnscope.replay(cell, torch.randn(2, 4, 3))
    assert tr.h_n.shape == (2, 4)


@pytest.mark.parametrize("module, match", [
    (PlusOneLSTM(3, 4), r"PlusOneLSTM subclasses nn\.LSTM but its forward computes something "
                        r"else \(max difference 1 on a probe input\).*nn\.LSTM's"),
    (FailingGRU(3, 4), r"FailingGRU subclasses nn\.GRU but its forward fails on a probe input "
                       r"\(TypeError: .*lengths"),
    (OutputOnlyGRU(3, 4), "returns a different structure"),
    (HalfCell(3, 4), r"HalfCell subclasses nn\.GRUCell but its forward computes something else"),
])
def test_subclasses_that_compute_something_else_are_refused(module, match, untouched):
    snapshot, assert_untouched = untouched
    before = snapshot(module)
    with pytest.raises(TypeError, match=match):
        rnnscope.replay(module, torch.randn(2, 5, 3))
    assert_untouched(module, before)
    with pytest.raises(TypeError, match=match):  # cached, and exposed for other callers
        recurrent.check_subclass(module)


def test_subclass_check_leaves_rng_hooks_and_mode_alone(untouched):
    snapshot, assert_untouched = untouched
    calls = []

    class CountingLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            calls.append(1)
            return super().forward(x, hx)

    m = CountingLSTM(3, 4, num_layers=2, dropout=0.5)  # training mode: the probe draws masks
    m.register_forward_hook(lambda *a: calls.append("hook"))
    before = snapshot(m)
    state = torch.get_rng_state()
    recurrent.check_subclass(m)  # passes: both forwards saw the same generator state
    assert torch.equal(torch.get_rng_state(), state)
    assert_untouched(m, before)
    assert "hook" not in calls and len(calls) == 2  # two probes, forward called directly
    recurrent.check_subclass(m)
    assert len(calls) == 2  # cached per module
    x = torch.randn(5, 2, 3)
    state = torch.get_rng_state()
    out, _ = m(x)
    tr = rnnscope.replay(m, x, rng_state=state)
    _close(tr.output, out, 1e-5)


def test_unsupported_module_types_stay_refused():
    x = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match="cannot replay a Linear"):
        rnnscope.replay(nn.Linear(3, 4), x)
    assert not recurrent.is_recurrent(nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"DirectRNNBase subclasses nn\.RNNBase but none of"):
        recurrent.describe(DirectRNNBase("LSTM", 3, 4))
