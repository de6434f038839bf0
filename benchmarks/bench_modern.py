"""Modern recurrences (issue 13): rnnscope's closed-form / scan path against the torch.func
custom-cell path, timed side by side in one run (benchmarks/timing.py `compare_times`,
torch.utils.benchmark Timer, candidates interleaved round after round).

    PYTHONPATH=src python benchmarks/bench_modern.py [--quick] [--rounds R] [--models a,b]

Task, per model at T=1000, H=128, B=4, I=32, float32: every state s_t and every one-step
Jacobian ∂s_t/∂s_{t−1}.

- rnnscope path. Linear in the state (minGRU, minLSTM, LRU, RG-LRU, S6): the parallel-scan
  states (`hidden_states`) and `rnnscope.step_jacobians(module, x)`, whose closed form is the
  diagonal decay a_t — the whole Jacobian — with the indirect part exactly 0.
  sLSTM (its state feeds its gates): the dense closed-form Jacobians (B, T, 4H, 4H), built
  16 steps at a time (`SLSTM.step_jacobian_fn`) into one reused buffer, each reduced to its
  Frobenius norm (the T·B·(4H)² values are never held at once).
- torch.func path, what a PyTorch user writes for a custom cell: the sequential loop of the
  cell's `.step`, then, one step at a time, `vmap(jacrev(step))` over the batch on the flat
  real state (the LRU's complex state as interleaved (Re, Im): jacrev refuses complex
  outputs). Each (B, M, M) Jacobian is reduced on the spot — to its diagonal and the largest
  |off-diagonal| entry for the linear recurrences, to its Frobenius norm for sLSTM — so memory
  stays bounded and the baseline does no more work than needed.

The two paths' results (those of the last timed call) are checked against each other (the diagonal equals the
decay, the off-diagonal is 0; sLSTM's per-step norms agree and, on the first 16 steps, the full
matrices); a mismatch stops the benchmark. A second table, for the linear recurrences, times
∂(Σ outputs)/∂(x, θ) through the scan against the sequential loop.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rnnscope  # noqa: E402
from rnnscope.modern import LRU, RGLRU, SLSTM, MinGRU, MinLSTM, SelectiveSSM  # noqa: E402
from timing import compare_times, report  # noqa: E402

CHUNK = 16  # sLSTM steps whose dense Jacobians are built at once


# --- the torch.func custom-cell path ---------------------------------------------------------

def flat_step(module):
    """(step(x_t (I,), s (M,)) -> s' (M,), s0 (B, M), from_flat): the module's .step on one
    sample's flat real state."""
    H = module.hidden_size
    if isinstance(module, SLSTM):
        def step(x_t, s):
            return torch.cat(module.step(x_t[None], tuple(s[None].chunk(4, -1))), -1)[0]
        return step, lambda B: torch.zeros(B, 4 * H)
    S = module.state_shape
    if module.state_dtype.is_complex:  # LRU: interleaved (Re, Im) per unit
        def step(x_t, s):
            h = torch.view_as_complex(s.view(*S, 2))[None]
            return torch.view_as_real(module.step(x_t[None], h)[0]).reshape(-1)
        return step, lambda B: torch.zeros(B, 2 * H)
    n = 1
    for d in S:
        n *= d

    def step(x_t, s):
        return module.step(x_t[None], s.view(1, *S))[0].reshape(-1)
    return step, lambda B: torch.zeros(B, n)


def torch_func_path(module, x, reduce):
    """The sequential .step loop, then vmap(jacrev(step)) one step at a time, each (B, M, M)
    Jacobian reduced by `reduce` on the spot. Returns the stacked reductions."""
    from torch.func import jacrev, vmap

    step, zeros = flat_step(module)
    batched = vmap(step)
    jac = vmap(jacrev(step, argnums=1))
    with torch.no_grad():
        s = zeros(x.shape[0])
        prev = []
        for x_t in x.unbind(1):  # the states (unbind once: no per-step select of x)
            prev.append(s)
            s = batched(x_t, s)
        out = [reduce(jac(x_t, s_prev)) for x_t, s_prev in zip(x.unbind(1), prev)]
    return tuple(torch.stack(parts, 1) for parts in zip(*out))


def linear_reduce(complex_state):
    """(B, M, M) Jacobian -> (its diagonal (B, M) — for complex states the diagonal 2×2
    blocks as (B, N, 2, 2) — and the largest |entry| off it, (B,))."""
    def reduce(J):
        B, M, _ = J.shape
        if complex_state:
            N = M // 2
            blocks = J.view(B, N, 2, N, 2)
            idx = torch.arange(N)
            diag = blocks[:, idx, :, idx, :].transpose(0, 1)  # (B, N, 2, 2)
            off = blocks.clone()
            off[:, idx, :, idx, :] = 0
        else:
            diag = J.diagonal(dim1=-2, dim2=-1)
            off = J - torch.diag_embed(diag)
        return diag, off.abs().amax(dim=(-2, -1))
    return reduce


def frobenius_reduce(J):
    return (torch.linalg.matrix_norm(J),)


# --- the rnnscope path -------------------------------------------------------------------------

def rnnscope_linear(module, x):
    with torch.no_grad():
        states = module.hidden_states(x)  # parallel scan
    return states, rnnscope.step_jacobians(module, x)


def rnnscope_slstm(module, x):
    """States and the per-step ‖∂s_t/∂s_{t−1}‖_F from the closed-form dense Jacobians,
    CHUNK steps at a time."""
    B, T = x.shape[:2]
    M = 4 * module.hidden_size
    with torch.no_grad():
        states = module.hidden_states(x)
        at = module.step_jacobian_fn(x)
        buf = torch.empty(B, min(CHUNK, T), M, M)  # one buffer, reused chunk after chunk
        norms = []
        for s in range(0, T, CHUNK):
            S = min(CHUNK, T - s)
            norms.append(torch.linalg.matrix_norm(at(slice(s, s + S), out=buf[:, :S])))
    return states, torch.cat(norms, 1)


# --- checks: a mismatch stops the benchmark ----------------------------------------------------

def check_linear(module, x, fast, slow):
    _, sj = fast
    diag, off = slow
    assert float(off.max()) == 0.0, f"{type(module).__name__}: off-diagonal {float(off.max())}"
    assert float(sj.indirect_spectral.abs().max()) == 0.0
    B, T = x.shape[:2]
    a = sj.direct  # (B, T, N), float64 / complex128
    if a.is_complex():
        want = torch.stack([a.real, a.imag], -1)  # first column of [[Re, −Im], [Im, Re]]
        got = diag[..., :, 0].double()
        assert torch.allclose(diag[..., 0, 0], diag[..., 1, 1]) and \
            torch.allclose(diag[..., 0, 1], -diag[..., 1, 0])
    else:
        want, got = a, diag.reshape(B, T, -1).double()
    err = float(((got - want).abs() / (want.abs() + 1e-6)).max())
    assert err < 1e-4, f"{type(module).__name__}: diagonal differs by {err:.2e} (relative)"
    return err


def check_slstm(module, x, fast, slow):
    _, norms = fast
    (ref,) = slow
    err = float(((norms - ref).abs() / ref.abs().clamp(min=1e-6)).max())
    assert err < 1e-4, f"SLSTM: per-step Frobenius norms differ by {err:.2e} (relative)"
    # the full matrices, on the first CHUNK steps
    from torch.func import jacrev, vmap

    step, zeros = flat_step(module)
    with torch.no_grad():
        A = module.step_jacobian_fn(x)(slice(0, CHUNK))
        s, full = zeros(x.shape[0]), []
        for t in range(CHUNK):
            full.append(vmap(jacrev(step, argnums=1))(x[:, t], s))
            s = vmap(step)(x[:, t], s)
    torch.testing.assert_close(A, torch.stack(full, 1), rtol=1e-4, atol=1e-5)
    return err


# --- the run -----------------------------------------------------------------------------------

def build(name, I, H):
    return {"MinGRU": lambda: MinGRU(I, H), "MinLSTM": lambda: MinLSTM(I, H),
            "LRU": lambda: LRU(I, H), "RGLRU": lambda: RGLRU(I, H),
            "SelectiveSSM": lambda: SelectiveSSM(I, H, state_size=4),
            "SLSTM": lambda: SLSTM(I, H)}[name]()


MODELS = ("MinGRU", "MinLSTM", "LRU", "RGLRU", "SelectiveSSM", "SLSTM")


def run(quick: bool = False, rounds: int | None = None, models=MODELS, T: int = 1000,
        H: int = 128, fwd_bwd: bool = True) -> list:
    rounds = rounds or (2 if quick else 3)
    B, I = 4, 32
    rows = []
    for name in models:
        torch.manual_seed(0)
        m = build(name, I, H)
        x = torch.randn(B, T, I)
        M = {"LRU": 2 * H, "SelectiveSSM": 4 * H, "SLSTM": 4 * H}.get(name, H)
        if name == "SLSTM":
            fast = lambda m=m: rnnscope_slstm(m, x)  # noqa: E731
            slow = lambda m=m: torch_func_path(m, x, frobenius_reduce)  # noqa: E731
            check = check_slstm
            fast_name = "closed-form dense Jacobians, chunked"
        else:
            fast = lambda m=m: rnnscope_linear(m, x)  # noqa: E731
            slow = lambda m=m: torch_func_path(  # noqa: E731
                m, x, linear_reduce(m.state_dtype.is_complex))
            check = check_linear
            fast_name = "scan + closed-form step_jacobians"
        last = {}  # each path's latest result: checked after the timing (no extra run)
        keep = lambda key, fn: (lambda: last.__setitem__(key, fn()))  # noqa: E731
        t = compare_times({fast_name: keep("fast", fast),
                           "torch.func vmap(jacrev(.step)) per step": keep("slow", slow)},
                          rounds=rounds, warmup=0, label=name)
        err = check(m, x, last["fast"], last["slow"])
        title = (f"{name}: states + every step Jacobian (T={T}, H={H}, state M={M}, B={B}); "
                 f"results agree (max rel. diff {err:.1e})")
        row = report(title, t, fast_name, "≥10x")
        ratio = t["torch.func vmap(jacrev(.step)) per step"] / t[fast_name]
        print(f"  => rnnscope path {ratio:.1f}x faster")
        rows.append({**row, "model": name, "ratio": ratio})
        if name == "SLSTM" or quick or not fwd_bwd:
            continue

        def fb(forward, m=m):
            xg = x.clone().requires_grad_()
            forward(xg)[0].sum().backward()
            m.zero_grad(set_to_none=True)

        t = compare_times({"scan forward + backward": lambda m=m: fb(m.forward),
                           "sequential loop forward + backward": lambda m=m: fb(m.forward_steps)},
                          rounds=rounds, label=name)
        report(f"{name}: forward + backward (T={T}, H={H}, B={B})", t,
               "scan forward + backward", "")
    print("\nsummary: rnnscope path vs torch.func custom-cell path")
    for r in rows:
        print(f"  {r['model']:<14s} {r['ratio']:7.1f}x")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=200, fewer rounds, no fwd+bwd table")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--no-fwd-bwd", action="store_true",
                    help="skip the forward + backward table (scan vs loop)")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {','.join(MODELS)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    run(quick=args.quick, rounds=args.rounds, models=models, T=200 if args.quick else 1000,
        fwd_bwd=not args.no_fwd_bwd)


if __name__ == "__main__":
    main()
