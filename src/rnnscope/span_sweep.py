"""All span Jacobians J_n = ∂s_{T−1}/∂s_n of one layer/direction by a structure-aware adjoint sweep.

Instead of multiplying dense (M × M) one-step Jacobians, the N reported rows of ∂s_{T−1}/∂(·)
are carried as adjoint vectors and pulled back one step at a time with each cell's closed-form
vector-Jacobian product, all N rows of all B samples at once. For the LSTM (running state
(h, c), h of size P = H_out):

    A_h = ∂out/∂h_n  (B, N, P),   A_c = ∂out/∂c_n  (B, N, H)     (h_n and c_n independent)
    dm  = A_h [W_hr]                     ∂out/∂(o_n ⊙ tanh c_n)          (B, N, H)
    dc  = A_c + dm ⊙ e_n,  e_n = o_n (1 − tanh² c_n)   total ∂out/∂c_n (h_n moving with c_n)
    A_c ← dc ⊙ f_n
    A_h ← (dm ⊙ tanh c_n ⊙ o_n(1 − o_n)) W_ho + dc K_n
    K_n = diag(g i(1−i)) W_hi + diag(c_{n−1} f(1−f)) W_hf + diag(i(1−g²)) W_hg   (B, H, P)

The i, f, g gate blocks all scale dc, so they fold into one per-sample (H × P) matrix K_n that
costs O(B·H·P) to build; pulling back then takes N·H·P (shared W_ho) + N·H·P (batched K_n)
multiply-adds per sample and step, half of the 4·N·H·P of a VJP through the full
(4H × P) recurrent weight (what autograd does).

Each step is the cell's `step_vjp` (cells/__init__.py, the contract lag_sweep shares) with
fold=True: the rows of one sample meet that sample's folded matrix (K_n, M_n) in one batched
product. The per-kind parts left here are where the sweep starts (J_{T−1} = I) and what it reads
off.

Read-offs: state "c" J_n = dc (the cell-state Jacobian with h_n = o_n tanh(c_n) moving with
c_n); state "h" J_n = A_h (c_n held fixed); state "full" J_n = [A_h, A_c] (rows and columns
ordered (h, c)).

GRU (h' = (1 − z) n + z h): A ← A ⊙ z + A M_n with M_n = diag(α_r) W_hr + diag(α_z) W_hz +
diag(α_n) W_hn (B, H, H), the indirect one-step Jacobian. Vanilla RNN: A ← (A ⊙ act'_n) W_hh.
J_n = A for both.

Step numbering, `direct` and `share` follow `jacobians.cell_jacobians`: n = 0..T−1 in processing
order (direction 1 runs backward in time), J[:, T−1] = I, direct[:, n] = ∏_{m=n+1}^{T−1} f_m
(LSTM "c") or z_m (GRU), share = ‖D‖²_F / (‖D‖²_F + ‖J − D‖²_F), D = diag(direct).

Shape legend: B batch, T steps, S steps in a chunk, H hidden, P = H_out, N reported state size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cells import CELLS
from .cells.layer_trace import LayerTrace
from .recurrent import LayerParams
from .results import highway_energy_share

CHUNK = 16  # default chunk_size: steps whose Jacobians are reduced to norms at once

STATES = {"lstm": ("c", "h", "full"), "gru": ("h",), "rnn": ("h",)}


@dataclass(frozen=True)
class SpanSweep:
    """What `span_jacobians` returns; every field is a detached CPU tensor.

    Attributes:
        total: (B, T, N, N) J_n in the trace's dtype, or None with keep="norms".
        direct: (B, T, N) float64 highway product (LSTM "c", GRU) or None.
        spectral, frobenius: (B, T) float64 norms of J_n.
        share: (B, T) float64 highway energy share, or None without a highway.
    """

    total: torch.Tensor | None
    direct: torch.Tensor | None
    spectral: torch.Tensor
    frobenius: torch.Tensor
    share: torch.Tensor | None


def span_jacobians(lt: LayerTrace, p: LayerParams, *, kind: str, state: str,
                   nonlinearity: str = "tanh", keep: str = "full",
                   chunk_size: int | None = None) -> SpanSweep:
    """J_n = ∂s_{T−1}/∂s_n for n = 0..T−1 of one replayed layer/direction, with their norms.

    Args:
        lt: `replay(module, x, hx).layers[l][d]` (computed under no_grad or not; nothing here
            builds a graph).
        p: that layer/direction's parameters (`describe(module).params(l, d)`).
        kind: "lstm", "gru" or "rnn".
        state: LSTM "c", "h" or "full"; "h" for GRU and RNN (as in `cell_jacobians`).
        nonlinearity: "tanh" or "relu" (vanilla RNN).
        keep: "full" also returns `.total` (B, T, N, N); "norms" holds O(chunk_size·B·N²) of
            Jacobians at a time.
        chunk_size: steps reduced to norms at once (None: CHUNK).

    Example:
        >>> m = torch.nn.LSTM(3, 4, batch_first=True)
        >>> lt = rnnscope.replay(m, torch.randn(2, 5, 3)).layers[0][0]
        >>> p = rnnscope.recurrent.describe(m).params(0, 0)
        >>> sw = span_jacobians(lt, p, kind="lstm", state="c")
        >>> assert torch.equal(sw.total[:, -1], torch.eye(4).expand(2, 4, 4))
    """
    if kind not in STATES:
        raise ValueError(f"kind must be one of {tuple(STATES)}; got {kind!r}")
    if state not in STATES[kind]:
        raise ValueError(f"state must be one of {STATES[kind]} for kind {kind!r}; got {state!r}")
    if keep not in ("full", "norms"):
        raise ValueError(f"keep must be 'full' or 'norms'; got {keep!r}")
    if lt.lengths is not None:
        raise ValueError("span_jacobians does not handle a packed (variable-length) trace: a "
                         "carried step is not a cell step; use the dense sweep of "
                         "jacobians.cell_jacobians for PackedSequence inputs")
    # The trace caches these on first access, in the grad mode of that moment: build them in
    # the caller's mode, not under our no_grad, so the trace is left as a fresh one would be.
    _ = lt.gates, lt.prev_h, (lt.prev_c if kind == "lstm" else None)
    with torch.no_grad():
        steps, N, direct_steps = _sweep(lt, p, kind, state, nonlinearity)
        return _collect(steps, lt.h.shape[0], lt.h.shape[1], N, direct_steps, keep,
                        CHUNK if chunk_size is None else chunk_size,
                        lt.h.dtype, lt.h.device)


# ----------------------------------------------------------------------------------------------
# The adjoint steps: J_n for n = T−1 down to 0, each a (B, N, N) tensor that is only valid until
# the next one is produced (the caller copies it out). What a step's VJP reads and the step
# itself come from the cell module (cells/__init__.py: vjp_saved_from_trace, step_vjp folded per
# sample); what is per kind here is where the sweep starts and what it reads off.


def _start(kind: str, state: str, B: int, H: int, P: int, dt, dev):
    """The adjoint of J_{T−1} = I: the state cotangents (B, N, ·) of the N reported rows."""
    if kind != "lstm":
        return (torch.eye(H, dtype=dt, device=dev).expand(B, H, H).clone(),)
    N = {"c": H, "h": P, "full": P + H}[state]
    a_h = torch.zeros(B, N, P, dtype=dt, device=dev)
    a_c = torch.zeros(B, N, H, dtype=dt, device=dev)
    if state in ("h", "full"):
        a_h[:, :P].copy_(torch.eye(P, dtype=dt, device=dev))
    if state in ("c", "full"):
        a_c[:, N - H:].copy_(torch.eye(H, dtype=dt, device=dev))
    return a_h, a_c


def _sweep(lt: LayerTrace, p: LayerParams, kind: str, state: str, nonlinearity: str):
    """(the J_n generator, N, the per-step highway factors (B, T, N) or None)."""
    cell = CELLS[kind]
    B, T, P = lt.h.shape
    H = lt.c.shape[-1] if kind == "lstm" else P
    dt, dev = lt.h.dtype, lt.h.device
    w = cell.vjp_weights(p)
    saved = cell.vjp_saved_from_trace(p, lt, nonlinearity=nonlinearity)
    # per step, the saved fields as (B, 1, …): one broadcast row per sample against its N rows
    per_step = [type(saved)(*fields) for fields in zip(*(t.split(1, dim=1) for t in saved))]
    d = _start(kind, state, B, H, P, dt, dev)
    N = d[0].shape[1]
    j_buf = torch.empty(B, N, N, dtype=dt, device=dev) if state in ("c", "full") else None

    def steps():
        nonlocal d
        for n in range(T - 1, -1, -1):
            if state == "c":  # the row is the total ∂/∂c_n, formed inside the step's VJP
                d_prev, _ = cell.step_vjp(w, per_step[n], d, fold=True, dc_total=j_buf)
                yield j_buf
            else:
                if state == "full":
                    torch.cat(d, dim=-1, out=j_buf)
                yield d[0] if state == "h" else j_buf
                if n == 0:
                    break
                d_prev, _ = cell.step_vjp(w, per_step[n], d, fold=True)
            d = d_prev

    direct = None
    if kind == "gru":
        direct = saved.z
    elif kind == "lstm" and state == "c":
        direct = saved.f
    return steps(), N, direct


# ----------------------------------------------------------------------------------------------
# Collecting Jacobians and reducing them to norms chunk by chunk


def _collect(steps, B: int, T: int, N: int, direct_steps, keep: str, chunk: int, dtype,
             device) -> SpanSweep:
    total = torch.empty(B, T, N, N, dtype=dtype, device=device) if keep == "full" else None
    buf = None if total is not None else torch.empty(B, min(chunk, T), N, N, dtype=dtype,
                                                     device=device)
    direct = None
    if direct_steps is not None:  # ∏_{m=n+1}^{T−1} d_m: exclusive reverse cumulative product
        d64 = direct_steps.detach().to(torch.float64)
        rev = torch.cumprod(d64.flip(1), dim=1).flip(1)  # ∏_{m=n}^{T−1}
        direct = torch.cat([rev[:, 1:], torch.ones_like(rev[:, :1])], dim=1)
    spectral = torch.empty(B, T, dtype=torch.float64)
    frob = torch.empty(B, T, dtype=torch.float64)
    share = torch.empty(B, T, dtype=torch.float64) if direct is not None else None
    chunk_stop = T
    q = None  # (B, N, k) top left singular subspace of the last Jacobian reduced: a warm start
    for n, J in zip(range(T - 1, -1, -1), steps):
        chunk_start = max(0, chunk_stop - chunk)
        if total is not None:
            total[:, n].copy_(J)
        else:
            buf[:, n - chunk_start].copy_(J)
        if n == chunk_start:
            sl = slice(chunk_start, chunk_stop)
            js = total[:, sl] if total is not None else buf[:, :chunk_stop - chunk_start]
            q = _reduce(js, sl, spectral, frob, direct, share, q)
            chunk_stop = chunk_start
    return SpanSweep(total=total.cpu() if total is not None else None,
                     direct=direct.cpu() if direct is not None else None, spectral=spectral,
                     frobenius=frob, share=share)


def _reduce(js: torch.Tensor, sl: slice, spectral, frob, direct, share, q0):
    """Norms of a chunk of Jacobians js (B, S, N, N) for steps sl, written in place. Returns
    the top-k left singular subspace (B, N, k) of the chunk's first step, the warm start of the
    next chunk (its neighbour in the sweep).

    One float64 copy, scaled once (Y = J / max|J|), serves all three: the spectral norm, the
    Frobenius norm (‖Y‖_F, which the certificate needs anyway) and the highway share."""
    B, S, N, _ = js.shape
    j64 = js.to(torch.float64).reshape(B * S, N, N)
    y, s, finite, fro2 = _scaled(j64)
    start = None if q0 is None else q0.unsqueeze(1).expand(B, S, *q0.shape[1:]).reshape(
        B * S, *q0.shape[1:])
    sigma, q = _certified(y, s, finite, fro2, start)
    spectral[:, sl] = sigma.view(B, S).cpu()
    # ‖J‖_F = s ‖Y‖_F; inf/nan for a non-finite J, 0 for J = 0 (as matrix_norm gives)
    frob[:, sl] = torch.where(finite, fro2.sqrt() * s, s).view(B, S).cpu()
    if direct is not None:
        share[:, sl] = _share(j64, y, s, finite, direct[:, sl].reshape(B * S, N)).view(B, S).cpu()
    return q.view(B, S, *q.shape[1:])[:, 0]


def _share(j64: torch.Tensor, y: torch.Tensor, s: torch.Tensor, finite: torch.Tensor,
           d: torch.Tensor) -> torch.Tensor:
    """`results.highway_energy_share(J, d)` for J = s Y (K, N, N), d (K, N) float64, from the
    scaled copy already made: ‖D‖²_F / (‖D‖²_F + ‖J − D‖²_F) with both taken of (·)/s. Y's
    largest entry is 1, so the denominator cannot underflow; where |d| could overflow once
    scaled (|d| > 1e100 s), or some J is 0 or non-finite, the general function takes over."""
    dn = d / s.unsqueeze(-1)
    if not bool((finite & (dn.abs().amax(-1) <= 1e100)).all()):
        return highway_energy_share(j64, d)
    rest = y.clone()
    rest.diagonal(dim1=-2, dim2=-1).sub_(dn)
    rest2 = (rest * rest).sum((-2, -1))
    d2 = (dn * dn).sum(-1)
    return d2 / (d2 + rest2)


# ----------------------------------------------------------------------------------------------
# Spectral norms of many matrices, certified

BLOCK = 4  # width k of the subspace iterated on X Xᵀ
BLOCK_STEPS = 2  # subspace steps per chunk (warm-started from the neighbouring step)
POWER_STEPS = 12  # power steps on the Gram matrix for what the first stage does not certify
CERT_RTOL = 1e-11  # λ_max(X Xᵀ) is certified to lie in [θ, θ(1 + CERT_RTOL)]


def certified_spectral_norm(x: torch.Tensor, start: torch.Tensor | None = None):
    """‖X‖₂ of K square matrices x (K, N, N) float64, exact to ~1e−11 relative, and a k-column
    orthonormal basis (K, N, k) of the top left singular subspace (a warm start for neighbours).

    Everything reported is a proved lower bound θ = λ_max of a Rayleigh–Ritz compression of
    G = Y Yᵀ (Y = X / max|X|) whose matching upper bound lies within CERT_RTOL:

    1. Subspace steps on G without forming it (2·k·N² per step). Cauchy interlacing gives the
       Ritz values θ_i ≤ λ_i, and since G ⪰ 0, λ_1 ≤ ‖Y‖²_F − Σ_{i=2}^k θ_i. This proves the
       long-span Jacobians, which are numerically of low rank.
    2. The rest: G formed, power steps, and a Cholesky factorisation of θ(1 + CERT_RTOL)·I − G
       that succeeds proves λ_1 ≤ θ(1 + CERT_RTOL).
    3. What is still unproved (clustered top singular values) goes to `eigvalsh`.

    No value rests on the convergence of an iteration. A non-finite matrix gets max|X| (inf or
    nan), a zero matrix 0.
    """
    return _certified(*_scaled(x), start)


def _scaled(x: torch.Tensor):
    """x (K, N, N) -> (Y = x / s, s = max|x| (K,), finite (K,): s finite and > 0,
    ‖Y‖²_F (K,)); Y is 0 where s is not finite or 0."""
    s = x.abs().amax(dim=(-2, -1))  # (K,)
    finite = torch.isfinite(s) & (s > 0)
    if bool(finite.all()):  # the common case: one pass, no masking
        y = x / s[:, None, None]
    else:
        safe = torch.where(finite, s, torch.ones_like(s))
        y = x / safe[:, None, None]
        y = torch.where(finite[:, None, None], y, torch.zeros_like(y))
    return y, s, finite, (y * y).sum((-2, -1))


def _certified(y: torch.Tensor, s: torch.Tensor, finite: torch.Tensor, fro2: torch.Tensor,
               start: torch.Tensor | None):
    """`certified_spectral_norm` of x = s Y, given `_scaled(x)`."""
    K, N, _ = y.shape
    k = min(BLOCK, N)
    if start is None or start.shape[-1] != k:
        cols = (y * y).sum(-2).topk(k, dim=-1).indices  # Y's heaviest columns span G's top well
        start = torch.gather(y, 2, cols.unsqueeze(1).expand(K, N, k))
    q = torch.linalg.qr(start).Q
    yt = y.mT.contiguous()  # a strided Yᵀ would be copied by every product
    for _ in range(BLOCK_STEPS):
        q = torch.linalg.qr(torch.bmm(y, torch.bmm(yt, q))).Q
    z = torch.bmm(yt, q)  # (K, N, k)
    ritz, vec = torch.linalg.eigh(z.mT @ z)  # ascending; θ_i ≤ λ_i (Cauchy interlacing)
    q = q @ vec.flip(-1)  # Ritz vectors, largest first
    lam = ritz[..., -1].clone()
    upper = fro2 - ritz[..., :-1].sum(-1)
    todo = (finite & (upper > lam * (1 + CERT_RTOL))).nonzero()[:, 0]
    if todo.numel():
        lam[todo] = _gram_certified(y[todo], q[todo, :, 0], lam[todo])
    sigma = lam.clamp_min(0).sqrt() * s
    sigma = torch.where(finite, sigma, s)  # 0 for a zero matrix, inf/nan for a non-finite one
    return sigma, q


def _gram_certified(y: torch.Tensor, u: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """λ_max(Y Yᵀ) for y (K, N, N) by power steps from u (K, N) and a Cholesky certificate,
    `eigvalsh` for whatever the certificate does not prove."""
    K, N, _ = y.shape
    g = y @ y.mT
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    best = theta
    prev = None
    for _ in range(POWER_STEPS):
        w = torch.einsum("kij,kj->ki", g, u)
        rq = (u * w).sum(-1)  # uᵀGu with ‖u‖ = 1: a lower bound on λ_max
        best = torch.maximum(best, rq)
        u = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        if prev is not None and ((rq - prev).abs() <= 1e-15 * rq).all():
            break
        prev = rq
    shifted = torch.diag_embed((best * (1 + CERT_RTOL))[:, None].expand(K, N)) - g
    ok = (torch.linalg.cholesky_ex(shifted).info == 0) & (best > 0)
    lam = best.clone()
    rest = (~ok).nonzero()[:, 0]
    if rest.numel():
        lam[rest] = torch.linalg.eigvalsh(g[rest])[..., -1]
    return lam
