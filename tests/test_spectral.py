"""The batched spectral norm against torch.linalg.svdvals in float64 (the oracle: an SVD of
each matrix on its own), on drawn matrices that make a Gram-based method fail if it is careless:
ill-conditioned, rank-deficient, clustered, tiny (1e−300), huge (1e+300), zero, non-finite."""

import math

import pytest
import torch

from rnnscope.spectral import scaled, spectral_norm_of_scaled, spectral_norms


def _svd_oracle(x: torch.Tensor) -> torch.Tensor:
    """σ_max per matrix, one float64 SVD each (no batching, no Gram, no scaling)."""
    flat = x.reshape(-1, *x.shape[-2:]).to(torch.float64)
    return torch.stack([torch.linalg.svdvals(m)[0] for m in flat]).reshape(x.shape[:-2])


def _with_singular_values(sv: torch.Tensor, m: int, n: int, gen) -> torch.Tensor:
    """U diag(sv) Vᵀ (m, n) with random orthonormal U, V."""
    k = sv.numel()
    u, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    return u @ torch.diag(sv.to(torch.float64)) @ v.T


def _drawn(N: int, seed: int) -> torch.Tensor:
    """(K, N, N) float64: the hard cases plus random ones, each matrix rescaled at random."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    eye = torch.eye(N, dtype=torch.float64)
    mats = [
        eye, 3 * eye, -eye,
        _with_singular_values(1 - 1e-7 * torch.arange(N, dtype=torch.float64), N, N, gen),
        _with_singular_values(torch.tensor([1.0, 0.999] + [0.5] * (N - 2)), N, N, gen),
        _with_singular_values(torch.logspace(0, -15, N, dtype=torch.float64), N, N, gen),  # κ=1e15
        _with_singular_values(torch.tensor([2.0, 1.0]), N, N, gen),  # rank 2
        torch.outer(r(N), r(N)),  # rank 1
        torch.diag(torch.linspace(0.1, 2, N, dtype=torch.float64)),
        torch.diag(r(N)),
        1e-300 * r(N, N), 1e-200 * r(N, N), 1e-100 * r(N, N),
        1e100 * r(N, N), 1e300 * r(N, N) / N,
        torch.triu(r(N, N)),  # non-normal
        r(N, N),
    ]
    # a lone huge and a lone tiny entry: a scale that mixes 1e−160 and 1 in one matrix
    spike = 1e-160 * r(N, N)
    spike[0, -1] = 1.0
    mats.append(spike)
    x = torch.stack(mats)
    scales = 10.0 ** (torch.randint(-30, 30, (len(mats),), generator=gen).to(torch.float64))
    big = x.abs().amax((-2, -1))
    scales[(big < 1e-250) | (big > 1e250)] = 1.0  # no overflow to inf, no subnormal inputs
    return torch.cat([x, x * scales[:, None, None]])


@pytest.mark.parametrize("N", [2, 5, 16, 64])
def test_spectral_norms_equal_svdvals_on_hard_matrices(N):
    x = _drawn(N, seed=N)
    want = _svd_oracle(x)
    got = spectral_norms(x, chunk=7)  # chunks of an odd size: the batching must not matter
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(spectral_norms(x), want, rtol=1e-12, atol=0)


def test_spectral_norms_of_rectangular_float32_and_batched_shapes():
    gen = torch.Generator().manual_seed(3)
    for m, n in ((3, 9), (9, 3), (1, 7)):
        x = torch.randn(2, 5, m, n, generator=gen)  # float32: computed in float64 from it
        got = spectral_norms(x)
        assert got.shape == (2, 5)
        torch.testing.assert_close(got, _svd_oracle(x), rtol=1e-12, atol=0)


def test_spectral_norms_agree_at_every_chunk_size():
    x = _drawn(6, seed=11)
    ref = spectral_norms(x, chunk=x.shape[0])
    for chunk in (1, 2, 5, 64):
        torch.testing.assert_close(spectral_norms(x, chunk=chunk), ref, rtol=1e-15, atol=0)


def test_spectral_norms_of_zero_and_non_finite_matrices_leave_the_others_exact():
    x = _drawn(4, seed=5)
    want = _svd_oracle(x)
    bad = torch.zeros(4, 4, 4, dtype=torch.float64)
    bad[1, 0, 0] = math.inf
    bad[2, 1, 2] = math.nan
    bad[3, 0, 0], bad[3, 1, 1] = -math.inf, math.nan  # nan wins over inf
    got = spectral_norms(torch.cat([bad, x]))
    assert got[0] == 0 and got[1] == math.inf and math.isnan(got[2]) and math.isnan(got[3])
    torch.testing.assert_close(got[4:], want, rtol=1e-12, atol=0)


def test_scaled_keeps_the_largest_entry_one_and_marks_what_it_cannot_scale():
    x = torch.stack([1e-250 * torch.ones(2, 2, dtype=torch.float64),
                     torch.zeros(2, 2, dtype=torch.float64),
                     torch.full((2, 2), math.inf, dtype=torch.float64)])
    y, s, finite = scaled(x)
    assert finite.tolist() == [True, False, False]
    assert torch.equal(y[0], torch.ones(2, 2, dtype=torch.float64)) and not y[1:].any()
    got = spectral_norm_of_scaled(y, s, finite)
    assert got[0] == pytest.approx(2e-250, rel=1e-14) and got[1] == 0 and got[2] == math.inf


def test_spectral_norm_of_tiny_jacobians_is_relatively_exact():
    # A long saturated span: entries ~1e−100 to 1e−300. Squaring them unscaled underflows to 0
    # (a norm of 0 would read as "no gradient at all"); the scaled Gram keeps every digit.
    gen = torch.Generator().manual_seed(9)
    base = _with_singular_values(torch.tensor([1.0, 0.7, 0.2, 1e-9]), 8, 8, gen)
    x = torch.stack([base * 10.0 ** -e for e in (100, 160, 200, 250, 300)])
    want = 10.0 ** -torch.tensor([100, 160, 200, 250, 300], dtype=torch.float64)
    torch.testing.assert_close(spectral_norms(x), want, rtol=1e-13, atol=0)
    assert (torch.linalg.matrix_norm(x @ x.mT, ord=2)[2:] == 0).all()  # what squaring gives


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_eigensolver_is_exact_and_independent_of_threads_and_split(threads):
    """The eigensolver runs one thread per call over `torch.get_num_threads()` worker threads:
    the norms match the SVD oracle, are (for this size: some small odd sizes round by memory
    position, see spectral.py) bit for bit the same whatever the thread count and the
    chunking, and the thread setting is restored."""
    x = torch.randn(37, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = _svd_oracle(x)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    reference = spectral_norms(x)
    torch.set_num_threads(threads)
    try:
        got = spectral_norms(x)
        assert torch.get_num_threads() == threads
        split = torch.cat([spectral_norms(x[:5]), spectral_norms(x[5:])])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert torch.equal(got, reference) and torch.equal(split, reference)


def test_threaded_eigensolver_restores_threads_and_raises_on_error(monkeypatch):
    """A failing solver call in a worker thread reaches the caller, and the thread setting is
    restored."""
    from rnnscope import spectral

    def broken(g):
        raise RuntimeError("solver failed")

    monkeypatch.setattr(spectral.torch.linalg, "eigvalsh", broken)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="solver failed"):
            spectral_norms(torch.randn(16, 8, 8))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_solver_pool_is_remade_after_a_fork(monkeypatch):
    """A forked child's copy of the pool has no threads: the solver makes its own."""
    from rnnscope import spectral

    first = spectral._solver_pool(2)
    assert spectral._solver_pool(2) is first
    monkeypatch.setattr(spectral.os, "getpid", lambda: -1)  # as seen from a forked child
    child = spectral._solver_pool(2)
    assert child is not first
    assert list(child.map(abs, [-1, -2])) == [1, 2]


@pytest.mark.parametrize("grad", [True, False])
def test_threaded_eigensolver_keeps_the_callers_grad_mode(grad):
    """Grad mode is thread-local and a new thread starts with it on: the worker threads are
    told the caller's, so under no_grad they build no graph for a matrix that requires grad,
    and with grad the norm is differentiable, as with a plain call."""
    from concurrent.futures import ThreadPoolExecutor

    from rnnscope import spectral

    x = torch.randn(16, 6, 6, dtype=torch.float64, requires_grad=True)
    with ThreadPoolExecutor(1) as other:  # a thread that never changed its grad mode
        assert other.submit(spectral._gram_top, x, grad).result().requires_grad == grad
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.set_grad_enabled(grad):
            n = spectral_norms(x)
    finally:
        torch.set_num_threads(before)
    assert n.requires_grad == grad
    if grad:
        n.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def _chunks(seed: int, sizes=(9, 40, 3, 17, 64)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(k, 12, 12, dtype=torch.float64, generator=gen) * 10.0 ** (i - 2)
            for i, k in enumerate(sizes)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_norm_queue_gives_each_chunk_its_norms_in_order(threads):
    """A sweep's chunks queued in `NormQueue`: every `then` gets exactly the norms a plain call
    gives (bit for bit, and the SVD oracle's to 1e-13), in the order put, with non-finite and
    zero matrices as in a plain call; the caller's thread setting is back afterwards."""
    from rnnscope.spectral import NormQueue

    chunks = _chunks(5)
    chunks[1][7] = float("nan")
    chunks[3][0] = 0.0
    chunks[3][2, 1, 1] = float("inf")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = [spectral_norm_of_scaled(*scaled(c)) for c in chunks]
        got = []
        with NormQueue() as q:
            for i, c in enumerate(chunks):
                q.put(*scaled(c), lambda v, i=i: got.append((i, v)))
                assert len(q._pending) <= NormQueue.MAX_PENDING
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert [i for i, _ in got] == list(range(len(chunks)))
    for (_, v), w, c in zip(got, want, chunks):
        assert torch.equal(v.nan_to_num(-1.0), w.nan_to_num(-1.0))
        ok = torch.isfinite(c.abs().amax((-2, -1)))
        torch.testing.assert_close(v[ok], _svd_oracle(c[ok]), rtol=1e-13, atol=0)
    assert torch.isnan(got[1][1][7]) and got[3][1][0] == 0 and got[3][1][2] == math.inf


def test_norm_queue_overlaps_and_lowers_the_callers_threads_while_it_waits():
    """While chunks are queued the caller runs torch with one thread (its own ops would leave
    OpenMP threads spinning on the solvers' cores); `then` runs in the caller's thread."""
    import threading

    from rnnscope.spectral import NormQueue, _openmp

    if not _openmp():
        pytest.skip("the queue solves at once without OpenMP")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        with NormQueue() as q:
            q.put(*scaled(_chunks(1)[4]), lambda v: seen.append(threading.get_ident()))
            assert torch.get_num_threads() == 1 and len(q._pending) == 1 and not seen
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [threading.get_ident()]


def test_norm_queue_after_an_error_restores_threads_and_calls_nothing(monkeypatch):
    """An error in the caller's block, or in a solver thread, leaves nothing running, calls no
    `then`, restores the thread setting and reaches the caller."""
    from rnnscope import spectral

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    called = []
    try:
        with pytest.raises(KeyError):
            with spectral.NormQueue() as q:
                q.put(*scaled(_chunks(2)[4]), called.append)
                raise KeyError("the sweep failed")
        assert torch.get_num_threads() == 2 and not called

        def broken(g):
            raise RuntimeError("solver failed")

        monkeypatch.setattr(spectral.torch.linalg, "eigvalsh", broken)
        with pytest.raises(RuntimeError, match="solver failed"):
            with spectral.NormQueue() as q:
                for c in _chunks(3):
                    q.put(*scaled(c), called.append)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert not called or all(isinstance(v, torch.Tensor) for v in called)  # only solved ones


def test_norm_queues_in_two_threads_with_their_own_thread_counts():
    """Two Python threads, each with its own torch thread count, queue norms at once: each
    thread count has its own solver pool, and none is shut down under the other's work (one
    shared pool, replaced on a count change, raised 'cannot schedule new futures after
    shutdown' within seconds)."""
    import threading
    import time

    from rnnscope.spectral import NormQueue

    y, s, f = scaled(torch.randn(40, 6, 6, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(0)))
    want = spectral_norm_of_scaled(y, s, f)
    errors, rounds = [], []

    def work(threads):
        torch.set_num_threads(threads)
        stop = time.monotonic() + 2.0
        try:
            while time.monotonic() < stop and not errors:
                got = []
                with NormQueue() as q:
                    for _ in range(5):
                        q.put(y, s, f, got.append)
                assert all(torch.allclose(g, want, rtol=1e-13, atol=0) for g in got)
                rounds.append(threads)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{threads} threads: {type(e).__name__}: {e}")

    workers = [threading.Thread(target=work, args=(n,)) for n in (2, 3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == [] and {2, 3} <= set(rounds)
