"""sLSTM's dense closed-form step Jacobians built a chunk of steps at a time: every chunk size
gives the unchunked result, both equal float64 autograd through the module's step (rtol 1e-8),
and the analyses (step_jacobians, cell_jacobians, lyapunov_spectrum, state_gradients) never ask
the module for more than `chunk_size` steps at once."""

from __future__ import annotations

import pytest
import torch

from rnnscope import SLSTM, cell_jacobians, lyapunov_spectrum, state_gradients, step_jacobians

D64 = torch.float64


def close(a, b, rtol=1e-8, what=""):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = b.abs().max().clamp(min=1e-300)
    err = ((a - b).abs() / (b.abs() + scale * 1e-6)).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def draw(seed):
    """A drawn configuration: H, forget gate, weight scale (both branches of the max), B, T,
    an initial state or none."""
    gen = torch.Generator().manual_seed(seed)
    H = int(torch.randint(2, 7, (1,), generator=gen))
    B = int(torch.randint(1, 4, (1,), generator=gen))
    T = int(torch.randint(17, 41, (1,), generator=gen))  # more than one default chunk of 16
    gate = ("sigmoid", "exp")[seed % 2]
    torch.manual_seed(seed)
    m = SLSTM(3, H, dtype=D64, forget_gate=gate)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(float(torch.empty(()).uniform_(1.0, 3.0, generator=gen)))
    x = torch.randn(B, T, 3, generator=gen, dtype=D64) * 0.7
    hx = None
    if seed % 3 == 0:
        hx = (torch.randn(1, B, H, generator=gen, dtype=D64),
              torch.randn(1, B, H, generator=gen, dtype=D64),
              torch.rand(1, B, H, generator=gen, dtype=D64) + 0.5,
              torch.randn(1, B, H, generator=gen, dtype=D64))
    return m, x, hx


def autograd_steps(m, x, hx):
    """(B, T, 4H, 4H) ∂s_t/∂s_{t−1} by float64 autograd of the module's own step, per sample."""
    B, T, _ = x.shape
    H = m.hidden_size
    s = tuple(p[0] for p in hx) if hx is not None else tuple(torch.zeros(B, H, dtype=D64)
                                                             for _ in range(4))
    out = []
    for t in range(T):
        v0 = torch.cat(s, -1).detach()

        def f(v, t=t):
            return torch.cat(m.step(x[:, t], tuple(v.chunk(4, -1))), -1)

        J = torch.autograd.functional.jacobian(f, v0)  # (B, M, B, M)
        out.append(torch.stack([J[b, :, b] for b in range(B)]))
        with torch.no_grad():
            s = m.step(x[:, t], s)
    return torch.stack(out, 1)


@pytest.mark.parametrize("seed", range(6))
def test_chunked_step_jacobians_equal_unchunked_and_autograd(seed):
    m, x, hx = draw(seed)
    T = x.shape[1]
    with torch.no_grad():
        whole = m.step_jacobians(x, hx, chunk_size=T)
        for k in (1, 5, 16, None):
            close(m.step_jacobians(x, hx, chunk_size=k), whole, rtol=1e-12,
                  what=f"chunk_size={k}")
    close(whole, autograd_steps(m, x, hx), what="closed form vs autograd")


def test_step_jacobian_fn_gives_any_slice():
    m, x, hx = draw(7)
    with torch.no_grad():
        whole = m.step_jacobians(x, hx)
        at = m.step_jacobian_fn(x, hx)
        close(at(slice(3, 11)), whole[:, 3:11], rtol=1e-12, what="slice 3:11")
        close(at(slice(x.shape[1] - 1, None)), whole[:, -1:], rtol=1e-12, what="last step")
    with pytest.raises(TypeError, match="contiguous slice"):
        at(slice(0, 10, 2))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        m.step_jacobians(x, chunk_size=0)


class Spy:
    """Records the slices the analyses ask the module for; refuses the unchunked build."""

    def __init__(self, m):
        self.m, self.sizes = m, []
        self.fn = m.step_jacobian_fn

    def __enter__(self):
        def fn(x, hx=None):
            at = self.fn(x, hx)

            def spied(sl):
                self.sizes.append(len(range(x.shape[1] if x.dim() == 3 else x.shape[0])[sl]))
                return at(sl)
            return spied

        def refuse(*a, **k):
            raise AssertionError("the analyses built all T step Jacobians at once")

        self.m.step_jacobian_fn, self.m.step_jacobians = fn, refuse
        return self

    def __exit__(self, *exc):
        del self.m.step_jacobian_fn, self.m.step_jacobians


@pytest.mark.parametrize("seed", [1, 3])
def test_analyses_build_one_chunk_at_a_time_and_agree(seed):
    m, x, hx = draw(seed)
    T = x.shape[1]
    ref_step = autograd_steps(m, x, hx)  # (B, T, M, M)
    with Spy(m) as spy:
        sj = step_jacobians(m, x, hx, keep="full", chunk_size=4)
        cj = cell_jacobians(m, x, hx, keep="full", chunk_size=4)
        ly = lyapunov_spectrum(m, x, hx, chunk_size=4)
        sg = state_gradients(m, x, hx, loss="all", keep="full")
    assert spy.sizes and max(spy.sizes) <= 16, spy.sizes
    with torch.no_grad():
        sj_whole = step_jacobians(m, x, hx, keep="full", chunk_size=T)
        cj_whole = cell_jacobians(m, x, hx, keep="full", chunk_size=T)
        ly_whole = lyapunov_spectrum(m, x, hx, chunk_size=T)
    close(sj.total, ref_step, what="step_jacobians chunked vs autograd")
    close(sj.total, sj_whole.total, rtol=1e-12, what="step_jacobians chunk 4 vs T")
    close(cj.total, cj_whole.total, rtol=1e-12, what="cell_jacobians chunk 4 vs T")
    # exponents of exactly singular directions (the stabiliser's s = 0 steps) are −inf in both
    fin = torch.isfinite(ly_whole.exponents)
    assert torch.equal(torch.isfinite(ly.exponents), fin) and bool(fin.any())
    close(ly.exponents[fin], ly_whole.exponents[fin], rtol=1e-10, what="lyapunov chunk 4 vs T")
    # the span Jacobian ∂s_{T−1}/∂s_n is the product of the autograd steps
    B, M = x.shape[0], ref_step.shape[-1]
    prod = torch.eye(M, dtype=D64).expand(B, M, M)
    for n in range(T - 1, T - 6, -1):  # the last few spans (the far ones underflow)
        close(cj.total[:, n], prod, what=f"span from {n}")
        prod = prod @ ref_step[:, n]
    # state gradients, backward over chunks, against autograd through the loop
    H = m.hidden_size
    s = tuple(p[0] for p in hx) if hx is not None else tuple(torch.zeros(x.shape[0], H, dtype=D64)
                                                             for _ in range(4))
    hs = []
    for t in range(T):
        s = m.step(x[:, t], s)
        hs.append(s[0])
    grads = torch.autograd.grad(torch.stack(hs, 1).sum(), hs)
    close(sg.layers[0][0].h_full, torch.stack(grads, 1), what="state gradients")


def test_a_reused_buffer_gives_the_fresh_result_even_when_written_in_between():
    m, x, hx = draw(4)
    B, T = x.shape[:2]
    M = 4 * m.hidden_size
    with torch.no_grad():
        whole = m.step_jacobians(x, hx, chunk_size=T)
        at = m.step_jacobian_fn(x, hx)
        buf = torch.empty(B, 6, M, M).to(D64).fill_(float("nan"))
        for start in range(0, T, 6):  # the same buffer chunk after chunk (last one shorter)
            S = min(6, T - start)
            got = at(slice(start, start + S), out=buf[:, :S])
            assert got.data_ptr() == buf.data_ptr()
            close(got, whole[:, start:start + S], rtol=1e-12, what=f"chunk at {start}")
            if start == 6:
                buf.fill_(3.0)  # the caller writes into it: its zeros must be rebuilt
    assert not torch.isnan(buf).any()
