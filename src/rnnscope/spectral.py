"""Spectral norms ‖X‖₂ of many small matrices at once, exact to float64 rounding.

    ‖X‖₂ = s · sqrt(λ_max(G)),   G = Y Yᵀ (or Yᵀ Y, the smaller side),   Y = X / s,  s = max|X|

One float64 copy scaled per matrix, one batched Gram product (BLAS-3) and one batched
`eigvalsh`. Why this is exact and not just "usually close":

- The top eigenvalue of a symmetric positive semi-definite G is perfectly conditioned in the
  absolute sense (Weyl: |λ̂ − λ| ≤ ‖E‖₂ for a perturbation E), and a backward-stable solver and
  the Gram product both perturb G by O(N·ε₆₄·‖G‖₂) with ‖G‖₂ = λ_max. So λ_max comes out with
  a *relative* error of O(N·ε₆₄) (~1e−14), and σ = sqrt(λ) with half that. Squaring the
  condition number hurts the small singular values of X, never the largest.
- The scaling by s = max|X| (per matrix) keeps Y's largest entry 1: the Gram entries lie in
  [0, N], so nothing overflows or underflows however tiny (1e−300, a long saturated span) or
  huge (1e+300) X is. Entries of Y below ~1e−154 underflow when squared, which changes λ_max
  by less than 1e−300 relative.
- A matrix holding a NaN gives nan, one holding ±inf (and no NaN) gives inf, a zero matrix 0;
  non-finite matrices never reach the solver (which fails to converge on them), so the other
  matrices of the batch are computed exactly as without them.

Against the alternatives, measured on the loaded 2-core CPU (800 LSTM span Jacobians, B=4
T=200 H=64, N = 64, one thread): an SVD per matrix (`torch.linalg.svdvals`, what
`matrix_norm(ord=2)` runs) took 1.2-2× as long as Gram + `eigvalsh`. Subspace/power iteration
certified by a Frobenius-tail bound and a Cholesky test (what the span sweep used before) took
~1.5× as long and certified none of the 800 in its cheap stage: the span Jacobians of a
recurrent network have clustered top singular values (σ₂/σ₁ ≈ 0.85-0.95 over the first tens of
steps), so iterations do not converge in a few steps, and the per-matrix LAPACK calls of the
certificates (QR, Cholesky) cost about as much as the eigensolver.

The eigensolver runs one thread per call, the batch split over `torch.get_num_threads()`
Python threads (`_top_gram_eigenvalues`). MKL's `syevd` gains nothing from its own threads on
N ≤ 256 (0.89 s with 2 threads against 0.72 s with 1 for 1000 matrices of N = 128) and
releases the GIL, so two threads with one stream of matrices each take 0.50 s: 1.8× on the
2-core machine (1.5× with the Gram products, which run in the same threads). The bits can
depend on how the batch is split, so on the thread count: MKL rounds some matrix sizes
(smaller Gram sides of 5, 7, 9, 11, ...) differently by where they lie in memory, by ~1e−15
relative (17 of the 100 shapes from 1×1 to 10×10, 9 matrices each, at 1 against 2 threads);
the 128 × 128 and 24 × 24 cases measured agree bit for bit. MKL's own threaded `syevd`
rounds differently again (2.5e−15 relative).

Shape legend: K matrices, N rows/columns.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

CHUNK = 256  # matrices per float64 Gram/eigvalsh batch: bounds the float64 working memory
CHUNK_BYTES = 32 << 20  # float64 bytes of one chunk of step-indexed matrices (default chunks)
MAX_CHUNK_STEPS = 64


def steps_per_chunk(batch: int, n: int) -> int:
    """Default chunk_size of the step-indexed Jacobian analyses (`step_jacobians`,
    `cell_jacobians`, `lyapunov_spectrum`, `span_sweep`) holding `batch` (n, n) matrices per
    step: as many steps as keep one chunk's float64 copy within CHUNK_BYTES (32 MiB), from 1
    to MAX_CHUNK_STEPS. Large batches keep the eigensolver's threads busy
    (`_top_gram_eigenvalues`): the Jacobian norms of `compare --seq-len 1000` (B = 1, N = 128)
    took 6.2-6.4 s in chunks of 64 steps against 8.6-9.1 s in chunks of 16."""
    return max(1, min(MAX_CHUNK_STEPS, CHUNK_BYTES // max(1, batch * n * n * 8)))


def scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., m, n) real -> (Y = x / s in float64, s = max|x| (...) float64, finite (...) bool).

    `finite` is True where s is finite and > 0; Y is 0 where it is not (a zero matrix, or one
    holding a NaN/Inf, whose s is then nan or inf). A float32 x is read once: max|x| is exact
    in float32, and x / s promotes each entry to float64 before dividing, so Y is bit for bit
    x.double() / s without that float64 copy."""
    s = x.abs().amax(dim=(-2, -1)).to(torch.float64)  # nan if any entry is, else inf if any is
    finite = torch.isfinite(s) & (s > 0)
    if bool(finite.all()):  # the common case: one pass, no masking
        return x / s[..., None, None], s, finite
    safe = torch.where(finite, s, torch.ones_like(s))
    y = torch.where(finite[..., None, None], x / safe[..., None, None],
                    torch.zeros((), dtype=torch.float64))
    return y, s, finite


def spectral_norm_of_scaled(y: torch.Tensor, s: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """‖X‖₂ (...) float64 for X = s·Y, given `scaled(X)`: s·sqrt(λ_max(Gram of Y)); s itself
    (0, inf or nan) where X is zero or non-finite."""
    lam = _top_gram_eigenvalues(y).clamp_min(0)
    return torch.where(finite, lam.sqrt() * s, s)


def spectral_norms(x: torch.Tensor, *, chunk: int = CHUNK) -> torch.Tensor:
    """Exact ‖X‖₂ of a batch of matrices x (..., m, n), as float64 (...), `chunk` matrices at a
    time (memory O(chunk·m·n) in float64 beyond the input).

    Agrees with `torch.linalg.matrix_norm(x.double(), ord=2)` to ~1e−14 relative on finite
    input; nan for a matrix holding a NaN, inf for one holding ±inf (and no NaN), 0 for zero.

    Example:
        >>> x = torch.diag(torch.tensor([3.0, -4.0])).expand(5, 2, 2)
        >>> assert torch.equal(spectral_norms(x), torch.full((5,), 4.0, dtype=torch.float64))
    """
    lead = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:])
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start:start + chunk]
        out[start:start + part.shape[0]] = spectral_norm_of_scaled(*scaled(part))
    return out.reshape(lead)


MIN_PER_THREAD = 4  # matrices per eigensolver thread below which one thread does it all
# thread count -> pool, for the process `_pools_pid`: kept, since new threads cost 3 ms per call
# in thread setup; never shut down while the process lives, since another Python thread (with
# its own torch thread count) may be handing work to any of them
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_pid: int | None = None
_pools_lock = threading.Lock()


def _solver_pool(threads: int) -> ThreadPoolExecutor:
    """The eigensolver's worker threads (`threads` of them, one torch thread each), one pool
    per thread count, made on first use; made anew in a forked child (whose copies of the pools
    have no threads: work handed to them would never run)."""
    global _pools_pid
    with _pools_lock:
        pid = os.getpid()
        if _pools_pid != pid:
            _pools.clear()
            _pools_pid = pid
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(
                threads, thread_name_prefix="rnnscope-eigvalsh",
                initializer=torch.set_num_threads, initargs=(1,))
        return pool


@functools.cache
def _openmp() -> bool:
    """Whether ATen's parallel backend is OpenMP, where the thread count may be changed at any
    time; the native backend warns and ignores a change once its pool has started, so there
    the solver runs as one plain call."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _gram_top(y: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """y (K, m, n) -> λ_max of the smaller Gram matrix of each, (K,); `grad`: the caller's grad
    mode (thread-local, so a worker thread is told)."""
    with torch.set_grad_enabled(grad):
        g = y.mT @ y if y.shape[-1] <= y.shape[-2] else y @ y.mT
        return torch.linalg.eigvalsh(g)[:, -1]


def _top_gram_eigenvalues(y: torch.Tensor) -> torch.Tensor:
    """λ_max(Gram of y) for y (..., m, n), Gram product and `eigvalsh` with one thread per call,
    the batch split over `torch.get_num_threads()` Python threads (see the module docstring).

    Both run in the worker threads: a multi-threaded product in this thread right before
    leaves OpenMP's threads spinning on the cores the solvers need (measured: the gain went
    from 1.5× to none). The thread setting is process-wide while they run and is restored
    after, also on an error; a GPU batch is one call."""
    lead = y.shape[:-2]
    flat = y.reshape(-1, *y.shape[-2:])
    grad = torch.is_grad_enabled()
    if flat.device.type != "cpu" or not _openmp():
        return _gram_top(flat, grad).reshape(lead)
    threads = torch.get_num_threads()
    parts = min(threads, flat.shape[0] // MIN_PER_THREAD)
    torch.set_num_threads(1)
    try:
        if parts <= 1:
            top = _gram_top(flat, grad)
        else:
            chunks = flat.chunk(parts)
            top = torch.cat(list(_solver_pool(threads).map(_gram_top, chunks,
                                                            [grad] * len(chunks))))
    finally:
        torch.set_num_threads(threads)
    return top.reshape(lead)


class NormQueue:
    """Spectral norms of chunks a sweep hands in one by one, solved in the eigensolver's worker
    threads while the sweep builds the next chunk.

    The sweeps (`span_sweep`, `step_jacobians`) alternate between building a chunk of
    Jacobians (small ops, mostly one core) and reducing it (`eigvalsh` on every core), each
    waiting for the other. Queued, the two overlap: `cell_jacobians` of the default RNN at
    T=1000 went from 0.94-1.15 s to 0.70-0.76 s. The norms are the bits
    `spectral_norm_of_scaled` gives at the caller's thread count (see the module docstring
    for how those may depend on it).

    Use as a context manager; `put(y, s, finite, then)` queues `scaled(X)` of a chunk, and
    `then(norms)` is called in this thread with `spectral_norm_of_scaled(y, s, finite)` once
    they are solved: at a later `put` or on leaving the block, in the order put. At most
    `MAX_PENDING` chunks wait at once (each holds its float64 copy alive). While any is queued
    this thread runs torch with one thread, so that its own ops do not leave OpenMP threads
    spinning on the cores the solvers need; the setting is restored on leaving, also on an
    error (when the queued work is cancelled or waited for, and no `then` is called).
    Where the solver runs as one plain call (GPU, ATen's native backend, one thread), `put`
    solves at once. A `then` must not `put` into its own queue (the order would then be the
    nested calls' first). Each Python thread uses its own queue.
    """

    MAX_PENDING = 2

    def __init__(self):
        self._pending: list = []  # (futures, s, finite, then)
        self._threads = None  # the caller's thread count while lowered to 1

    def __enter__(self) -> NormQueue:
        return self

    def put(self, y: torch.Tensor, s: torch.Tensor, finite: torch.Tensor, then) -> None:
        """Queue the chunk y (K, m, n) float64 (with s, finite (K,) from `scaled`)."""
        threads = self._threads or torch.get_num_threads()
        parts = min(threads, y.shape[0] // MIN_PER_THREAD)
        if y.device.type != "cpu" or not _openmp() or (parts <= 1 and not self._pending):
            then(spectral_norm_of_scaled(y, s, finite))
            return
        if self._threads is None:
            self._threads = threads
            torch.set_num_threads(1)
        while len(self._pending) >= self.MAX_PENDING:
            self._finish_oldest()
        grad = torch.is_grad_enabled()
        if parts <= 1:  # too small to share out: solved here, its `then` still in its turn
            done = Future()
            done.set_result(_gram_top(y, grad))
            futures = [done]
        else:
            pool = _solver_pool(threads)
            futures = [pool.submit(_gram_top, part, grad) for part in y.chunk(parts)]
        self._pending.append((futures, s, finite, then))

    def _finish_oldest(self) -> None:
        futures, s, finite, then = self._pending.pop(0)
        lam = torch.cat([f.result() for f in futures]).clamp_min(0)
        then(torch.where(finite, lam.sqrt() * s, s))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._finish_oldest()
        finally:
            for futures, *_ in self._pending:  # after an error: nothing left running
                for f in futures:
                    f.cancel()
                for f in futures:
                    if not f.cancelled():
                        f.exception()  # waits; its error, if any, is dropped with it
            self._pending.clear()
            if self._threads is not None:
                torch.set_num_threads(self._threads)
                self._threads = None
