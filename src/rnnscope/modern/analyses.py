"""The Jacobian, state-gradient, Lyapunov and gate analyses on decay recurrences
(modern/protocol.py), in closed form.

For a recurrence linear in its state, h_t = a_t ⊙ h_{t−1} + b_t, everything follows from the
decays a (B, T, N) alone, with no matrix ever formed:
- step Jacobian ∂h_t/∂h_{t−1} = diag(a_t), the whole of it (indirect part 0);
- span Jacobian ∂h_{T−1}/∂h_n = diag(∏_{m=n+1}^{T−1} a_m): the highway is the whole Jacobian,
  ‖J‖₂ = max_j |∏ a_j|, ‖J‖_F = sqrt(Σ_j |∏ a_j|²), highway share 1;
- Lyapunov exponents: the time averages of log|a_t,j|, sorted (exact for a diagonal product);
- state gradients: g_t = ∂ℓ/∂h_t|direct + conj(a_{t+1}) ⊙ g_{t+1}, one reverse linear scan
  (conj: PyTorch's gradient convention for complex states, as the LRU's).
For complex decays (the LRU) N counts complex units; seen as a real system each unit is a 2×2
scaled rotation and each exponent appears twice.

A recurrence whose state feeds its own gates (sLSTM) uses its closed-form full step Jacobians
A_t (B, T, M, M): `nonlinear_steps` hands them to jacobians.py's chunked products and QR, and
`state_gradients` runs g_t = d_t + A_{t+1}ᵀ g_{t+1}.

Shape legend: B batch, T time, S state shape, N = prod(S), M running-state size, k exponents.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch

from ..profile import per_sample_loss
from ..results import (CellJacobians, GateLayerStats, GateStats, LyapunovSpectrum,
                       StateGradientLayer,
                       StateGradients, StepJacobians)
from ..codec import SchemaError
from .protocol import DecaySpec
from .scan import linear_scan

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True, eq=False, repr=False)
class DecayCellJacobians(CellJacobians):
    """`CellJacobians` of a decay recurrence.

    Attributes:
        highway_is_whole: True when the recurrence is linear in its state: then J = diag(direct)
            exactly (direct = ∏ a, the decay product), `total` adds nothing to it and the
            highway share is 1. False for sLSTM-like recurrences, whose state feeds its gates.
        (the rest as `CellJacobians`; `direct` and `total` are complex for complex decays,
        and the norms are then those of the complex matrix: the LRU's real (Re, Im) form has
        the same spectral norm and a Frobenius norm √2 larger.)
    """

    highway_is_whole: bool = False

    def to_dict(self) -> dict:
        return {**super().to_dict(), "highway_is_whole": self.highway_is_whole}

    @classmethod
    def from_dict(cls, d, where: str = "DecayCellJacobians") -> DecayCellJacobians:
        base = CellJacobians.from_dict(d, where)
        whole = d.get("highway_is_whole") if isinstance(d, dict) else None
        if not isinstance(whole, bool):
            raise SchemaError(f"{where}['highway_is_whole'] must be true or false")
        return as_decay_cell_jacobians(base, whole)


def as_decay_cell_jacobians(res: CellJacobians, whole: bool) -> DecayCellJacobians:
    return DecayCellJacobians(**{f.name: getattr(res, f.name) for f in fields(res)},
                              highway_is_whole=whole)


# ----------------------------------------------------------------------------------------------
# Inputs, decays and states


def batch_major(spec: DecaySpec, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as (B, T, I), and whether it came unbatched (T, I)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor for a {type(spec.module).__name__}"
                        f"; got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 2:
        return x.unsqueeze(0), True
    if x.dim() != 3 or 0 in x.shape[:2]:
        layout = "(B, T, I)" if spec.batch_first else "(T, B, I)"
        raise ValueError(f"inputs must be {layout} with B, T ≥ 1 or unbatched (T, I) for this "
                         f"{type(spec.module).__name__}; got {tuple(x.shape)}")
    return (x if spec.batch_first else x.transpose(0, 1)), False


def _checked(spec: DecaySpec, what: str, v, B: int, T: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() < 2 or tuple(v.shape[:2]) != (B, T):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{type(spec.module).__name__}.{what} must return a batch-major "
                         f"(B={B}, T={T}, ...) tensor; got {got}")
    return v


def decays(spec: DecaySpec, x, hx, B: int, T: int) -> torch.Tensor:
    """a (B, T, N), flattened, detached."""
    with torch.no_grad():
        a = spec.module.decay(x) if spec.linear else spec.module.decay(x, hx)
    a = _checked(spec, "decay(x)", a, B, T)
    return a.detach().reshape(B, T, -1)


def _states(spec: DecaySpec, x, hx, B: int, T: int) -> torch.Tensor:
    with torch.no_grad():
        h = spec.module.hidden_states(x, hx)
    return _checked(spec, "hidden_states(x, hx)", h, B, T).detach()


def _full_steps(spec: DecaySpec, x, hx, B: int, T: int) -> tuple[callable, int]:
    """(at, M): `at(sl)` gives the closed-form step Jacobians A[:, sl] (B, S, M, M) of a
    nonlinear recurrence, a chunk of steps at a time when the module has `step_jacobian_fn`
    (then the T dense Jacobians are never held at once), else sliced from one
    `step_jacobians(x, hx)` call."""
    name = type(spec.module).__name__
    fn = getattr(spec.module, "step_jacobian_fn", None)
    if callable(fn):
        with torch.no_grad():
            raw = fn(x, hx)
        if not callable(raw):
            raise TypeError(f"{name}.step_jacobian_fn(x, hx) must return a callable "
                            f"steps -> (B, S, M, M); got {type(raw).__name__}")
    else:
        with torch.no_grad():
            A_all = _checked(spec, "step_jacobians(x, hx)", spec.module.step_jacobians(x, hx),
                             B, T).detach()
        raw = lambda sl: A_all[:, sl]  # noqa: E731
    M = None

    def at(sl: slice) -> torch.Tensor:
        nonlocal M
        with torch.no_grad():
            A = raw(sl)
        S = len(range(T)[sl])
        if not isinstance(A, torch.Tensor) or A.dim() != 4 or A.shape[:2] != (B, S) \
                or A.shape[-1] != A.shape[-2] or (M is not None and A.shape[-1] != M):
            got = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
            raise ValueError(f"{name}'s step Jacobians must be (B={B}, S={S}, M, M) for the "
                             f"{S} steps asked; got {got}")
        M = A.shape[-1]
        return A.detach()

    M = at(slice(0, 1)).shape[-1]
    return at, M


def _highway(spec: DecaySpec, x, hx, B: int, T: int, M: int) -> torch.Tensor | None:
    """d (B, T, M), the diagonal counted as highway of a nonlinear recurrence, or None."""
    fn = spec.entry.highway
    with torch.no_grad():
        if fn is not None:
            d = fn(spec.module, x, hx)
        elif callable(getattr(spec.module, "highway", None)):
            d = spec.module.highway(x, hx)
        else:
            return None
    d = _checked(spec, "highway(x, hx)", d, B, T).detach()
    if d.shape != (B, T, M):
        raise ValueError(f"{type(spec.module).__name__}.highway must return (B, T, M={M}), "
                         f"the diagonal of its step Jacobians; got {tuple(d.shape)}")
    return d


def _nonfinite_samples(fn: str, v: torch.Tensor) -> torch.Tensor:
    """(B,) bool: samples holding a NaN/Inf; warns with their count."""
    bad = ~torch.isfinite(v).reshape(v.shape[0], -1).all(1).cpu()
    k = int(bad.sum())
    if k:
        warnings.warn(f"{fn}: {k} of {bad.numel()} sample(s) have non-finite decays (NaN/Inf in "
                      "their inputs, states or the weights); their values are nan and the "
                      "summaries leave them out", RuntimeWarning, stacklevel=4)
    return bad


def _wide(a: torch.Tensor) -> torch.Tensor:
    """float64, or complex128 for complex values, on the CPU."""
    return a.to("cpu", torch.complex128 if a.is_complex() else torch.float64)


# ----------------------------------------------------------------------------------------------
# Linear in the state: closed forms from the decays


def step_jacobians(spec: DecaySpec, x, hx, *, keep: str) -> StepJacobians:
    """diag(a_t) and a zero indirect part (the whole Jacobian is the highway)."""
    xb, _ = batch_major(spec, x)
    B, T = xb.shape[:2]
    a = decays(spec, x, hx, B, T)
    bad = _nonfinite_samples("step_jacobians", a)
    direct = _wide(a).masked_fill(bad[:, None, None], math.nan)
    N = direct.shape[-1]
    indirect = spectral = None
    if keep == "full":
        # exactly zero, real even where the decay is complex (total = diag(direct) + 0)
        indirect = torch.zeros(B, T, N, N, dtype=torch.float64).masked_fill(
            bad[:, None, None, None], math.nan)
    else:
        spectral = torch.zeros(B, T, dtype=torch.float64).masked_fill(bad[:, None], math.nan)
    return StepJacobians(direct, indirect, spec.state, spec.kind, 0, 0, torch.arange(T),
                         nonfinite=bad, indirect_spectral=spectral)


def decay_products(a: torch.Tensor) -> torch.Tensor:
    """P[:, n] = ∏_{m=n+1}^{T−1} a_m, (B, T, N) from a (B, T, N); P[:, T−1] = 1."""
    ones = torch.ones_like(a[:, :1])
    tail = torch.cat([a[:, 1:], ones], 1).flip(1).cumprod(1).flip(1)  # ∏_{m=n+1}^{T−1}
    return tail


def cell_jacobians(spec: DecaySpec, x, hx, *, keep: str) -> DecayCellJacobians:
    """∂h_{T−1}/∂h_n = diag(∏_{m=n+1}^{T−1} a_m): the decay product is the whole Jacobian."""
    xb, _ = batch_major(spec, x)
    B, T = xb.shape[:2]
    a = decays(spec, x, hx, B, T)
    bad = _nonfinite_samples("cell_jacobians", a)
    direct = decay_products(_wide(a))
    mag = direct.abs()  # (B, T, N)
    top = mag.amax(-1)  # ‖J‖₂ of a diagonal
    safe = torch.where(top > 0, top, torch.ones_like(top))
    frob = top * ((mag / safe.unsqueeze(-1)) ** 2).sum(-1).sqrt()  # scaled: no underflow
    share = torch.where(top > 0, torch.ones_like(top), torch.full_like(top, math.nan))
    off = bad[:, None]
    direct = direct.masked_fill(off[..., None], math.nan)
    total = torch.diag_embed(direct) if keep == "full" else None
    return DecayCellJacobians(total=total, direct=direct, spectral=top.masked_fill(off, math.nan),
                              frobenius=frob.masked_fill(off, math.nan),
                              share=share.masked_fill(off, math.nan), state=spec.state,
                              kind=spec.kind, layer=0, direction=0, positions=torch.arange(T),
                              nonfinite=bad, highway_is_whole=True)


def lyapunov_spectrum(spec: DecaySpec, x, hx, *, k, warmup: int) -> LyapunovSpectrum:
    """Sorted time averages of log|a_t,j| over the steps after `warmup`: `.exponents` (B, k)
    float64."""
    xb, unbatched = batch_major(spec, x)
    B, T = xb.shape[:2]
    a = decays(spec, x, hx, B, T)
    N = a.shape[-1]
    k = N if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N={N}] (the state size); got {k!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < T:
        raise ValueError(f"warmup must be an int in [0, T={T}); got {warmup!r}")
    bad = _nonfinite_samples("lyapunov_spectrum", a)
    logs = _wide(a).abs().log()[:, warmup:].mean(1)  # (B, N); −inf for an exact zero decay
    exps = logs.sort(dim=-1, descending=True).values[:, :k]
    exps = exps.masked_fill(bad[:, None], math.nan)
    return LyapunovSpectrum(exps[0] if unbatched else exps, layer=0, direction=0,
                            warmup=warmup, state_size=N)


# ----------------------------------------------------------------------------------------------
# Nonlinear in the state: the closed-form full step Jacobians


def nonlinear_steps(spec: DecaySpec, x, hx):
    """(step(sl) -> (direct (B, S, M) or None, A (B, S, M, M)), B, T, M, unbatched) for
    jacobians.py's chunked span products and QR (`jacobians._Recurrence`)."""
    xb, unbatched = batch_major(spec, x)
    B, T = xb.shape[:2]
    at, M = _full_steps(spec, x, hx, B, T)
    d = _highway(spec, x, hx, B, T, M)

    def step(sl):
        return (d[:, sl] if d is not None else None), at(sl)

    return step, B, T, M, unbatched


# ----------------------------------------------------------------------------------------------
# State gradients


def state_gradients(spec: DecaySpec, x, hx, *, loss, keep: str, loss_name: str,
                    chunk: int = 16) -> StateGradients:
    """Total ∂L/∂h_t (and ∂L/∂c_t where the table names a cell state) for every step; a
    nonlinear recurrence's step Jacobians are built `chunk` steps at a time."""
    xb, _ = batch_major(spec, x)
    B, T = xb.shape[:2]
    h = _states(spec, x, hx, B, T)
    leaf = h.requires_grad_(True)
    with torch.enable_grad():
        readout = getattr(spec.module, "readout", None)
        y = readout(xb.detach(), leaf) if callable(readout) else leaf.reshape(B, T, -1)
        losses = per_sample_loss(y, loss, B)
        (g_out,) = torch.autograd.grad(losses.sum(), leaf, allow_unused=True)
    g_out = torch.zeros_like(leaf) if g_out is None else g_out
    direct = g_out.detach().reshape(B, T, -1)  # (B, T, N): the part injected at each step
    c = None
    if spec.linear:
        a = decays(spec, x, hx, B, T)
        # g_t = direct_t + conj(a_{t+1}) g_{t+1}: a forward scan over reversed time
        nxt = torch.cat([a[:, 1:].conj(), torch.zeros_like(a[:, :1])], 1)
        g = linear_scan(nxt.flip(1), direct.flip(1)).flip(1)
    else:
        at, M = _full_steps(spec, x, hx, B, T)
        inj = torch.zeros(B, T, M, dtype=direct.dtype, device=direct.device)
        inj[..., :direct.shape[-1]] = direct
        gs = [inj[:, T - 1]]
        # g_t = d_t + A_{t+1}ᴴ g_{t+1}, backward over chunks of steps: one chunk of A at a time
        for stop in range(T, 1, -chunk):
            start = max(stop - chunk, 1)
            A = at(slice(start, stop)).to(direct.dtype)  # A_start … A_{stop−1}
            for t in range(stop - 2, start - 2, -1):
                gs.append(inj[:, t] + (A[:, t + 1 - start].mH @ gs[-1].unsqueeze(-1)).squeeze(-1))
        full = torch.stack(gs[::-1], 1)  # (B, T, M)
        g = full[..., :direct.shape[-1]]
        if spec.entry.cell_gradient is not None:
            c = spec.entry.cell_gradient(spec.module, x, hx, full)
    return StateGradients(((_layer(g, c, keep),),), loss_name)


def _layer(g: torch.Tensor, c: torch.Tensor | None, keep: str) -> StateGradientLayer:
    norm = lambda t: _wide(t).abs().norm(dim=-1)  # noqa: E731 - complex-safe
    bad = sum(int((~torch.isfinite(t)).sum()) for t in (g, c) if t is not None)
    return StateGradientLayer(h=norm(g), c=norm(c) if c is not None else None,
                              h_full=g.cpu() if keep == "full" else None,
                              c_full=c.cpu() if c is not None and keep == "full" else None,
                              nonfinite=bad)


# ----------------------------------------------------------------------------------------------
# Gate statistics: the decay as the gate


def gate_stats(spec: DecaySpec, x, hx, *, bins: int) -> GateStats:
    """Statistics of |a_t| per unit as those of a forget gate; memory time 1/(1 − mean |a|)."""
    from ..gates import exact_quantiles  # gates imports this module's dispatch

    xb, _ = batch_major(spec, x)
    B, T = xb.shape[:2]
    v = _wide(decays(spec, x, hx, B, T)).abs()  # (B, T, N)
    flat = v.reshape(-1)
    fin = flat[torch.isfinite(flat)]
    bad = flat.numel() - fin.numel()
    hist = torch.histc(fin, bins=bins, min=0.0, max=1.0) / max(fin.numel(), 1)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    q = exact_quantiles(fin, QUANTILES)
    n = flat.numel()
    sat = {name: int(test(flat).sum()) / n
           for name, test in (("<0.01", lambda t: t < 0.01), ("<0.1", lambda t: t < 0.1),
                              (">0.9", lambda t: t > 0.9), (">0.99", lambda t: t > 0.99))}
    unit_mean = v.mean(dim=(0, 1))  # (N,)
    # 1/(1 − |a|) steps; a decay at or above 1 never forgets: inf
    memory = torch.where(unit_mean < 1, 1.0 / (1.0 - unit_mean.clamp(max=1 - 1e-300)),
                         torch.full_like(unit_mean, math.inf))
    stats = GateLayerStats(0, 0, "decay", float(flat.mean()), dict(zip(QUANTILES, q.tolist())),
                           hist, edges, sat, unit_mean, memory, bad)
    return GateStats(spec.kind, (stats,))
