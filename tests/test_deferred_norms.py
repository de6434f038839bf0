"""cell_jacobians(keep="full") computes its norms on first read: the values are the ones
keep="norms" streams (bit for bit), the result behaves as an ordinary frozen result (==,
to_dict/from_dict, pickle, repr), and non-finite samples are flagged as before."""

import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import rnnscope
from rnnscope.results import CellJacobians, Deferred
from rnnscope.span_sweep import span_jacobians, span_norms
from rnnscope.recurrent import describe

CASES = [(nn.LSTM, "c"), (nn.LSTM, "h"), (nn.LSTM, "full"), (nn.GRU, None), (nn.RNN, None)]


def _model(cls, seed=0):
    torch.manual_seed(seed)
    m = cls(3, 6, batch_first=True)
    with torch.no_grad():  # larger weights: the indirect paths matter
        for p in m.parameters():
            p.mul_(2.0)
    return m, torch.randn(3, 11, 3)


def _fields(r):
    return r.spectral, r.frobenius, r.share


@pytest.mark.parametrize("cls,state", CASES)
def test_full_norms_are_the_streamed_norms_bit_for_bit(cls, state):
    m, x = _model(cls)
    full = rnnscope.cell_jacobians(m, x, state=state, keep="full", chunk_size=4)
    assert isinstance(full.__dict__["_value_spectral"], Deferred)  # nothing computed yet
    norms = rnnscope.cell_jacobians(m, x, state=state, keep="norms", chunk_size=4)
    for a, b in zip(_fields(full), _fields(norms)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == torch.float64 and torch.equal(a, b)
    assert not isinstance(full.__dict__["_value_spectral"], Deferred)  # kept after reading
    # and they are the norms of the kept Jacobians (float64 oracle: an SVD per matrix)
    J = full.total.to(torch.float64)
    torch.testing.assert_close(full.spectral, torch.linalg.matrix_norm(J, ord=2), rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(full.frobenius, torch.linalg.matrix_norm(J), rtol=1e-12, atol=0)
    assert torch.equal(full.nonfinite, norms.nonfinite)


def test_a_deferred_result_compares_round_trips_and_pickles_like_a_computed_one():
    m, x = _model(nn.LSTM, seed=1)
    a = rnnscope.cell_jacobians(m, x, keep="full")
    b = rnnscope.cell_jacobians(m, x, keep="full")
    c = pickle.loads(pickle.dumps(a))  # pickled before any norm was read
    assert isinstance(c.__dict__["_value_share"], Deferred)
    assert a == b and c == a  # == reads (and computes) every field
    assert CellJacobians.from_dict(a.to_dict()) == a
    assert "spectral=float64[3, 11]" in repr(b)
    with pytest.raises(AttributeError):  # still frozen
        a.spectral = torch.zeros(3, 11)
    assert a.norms().spectral is a.spectral


def test_span_jacobians_keep_jacobians_then_span_norms_equals_keep_full():
    m, x = _model(nn.LSTM, seed=2)
    lt = rnnscope.replay(m, x).layers[0][0]
    p = describe(m).params(0, 0)
    full = span_jacobians(lt, p, kind="lstm", state="c", keep="full", chunk_size=3)
    bare = span_jacobians(lt, p, kind="lstm", state="c", keep="jacobians", chunk_size=3)
    assert bare.spectral is None and bare.frobenius is None and bare.share is None
    assert torch.equal(bare.total, full.total) and torch.equal(bare.direct, full.direct)
    for a, b in zip(span_norms(bare.total, bare.direct, 3), _fields(full)):
        assert torch.equal(a, b)


def test_a_non_finite_sample_with_keep_full_is_flagged_and_leaves_the_others_exact():
    m, x = _model(nn.LSTM, seed=3)
    clean = rnnscope.cell_jacobians(m, x, keep="full")
    xb = x.clone()
    xb[1, 4, 0] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = rnnscope.cell_jacobians(m, xb, keep="full")
        bad_n = rnnscope.cell_jacobians(m, xb, keep="norms")
    assert any("non-finite" in str(w.message) for w in caught)
    assert bad.nonfinite.tolist() == [False, True, False] == bad_n.nonfinite.tolist()
    for a, b, c in zip(_fields(bad), _fields(clean), _fields(bad_n)):
        assert a[1].isnan().all() and torch.equal(a[[0, 2]], b[[0, 2]])
        assert ((a == c) | (a.isnan() & c.isnan())).all()
    assert bad.total[1].isnan().all() and torch.equal(bad.total[[0, 2]], clean.total[[0, 2]])
