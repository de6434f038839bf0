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

from .cells.layer_trace import LayerTrace
from .cells.rnn import act_derivative
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
        steps, N, direct_steps = _STEPPERS[kind](lt, p, state, nonlinearity)
        return _collect(steps, lt.h.shape[0], lt.h.shape[1], N, direct_steps, keep,
                        CHUNK if chunk_size is None else chunk_size,
                        lt.h.dtype, lt.h.device)


# ----------------------------------------------------------------------------------------------
# Per-kind adjoint steps: each yields J_n for n = T−1 down to 0, a (B, N, N) tensor that is only
# valid until the next one is produced (the caller copies it out).


def _lstm_steps(lt: LayerTrace, p: LayerParams, state: str, nonlinearity: str):
    B, T, H = lt.c.shape
    P = lt.h.shape[-1]
    dt, dev = lt.h.dtype, lt.h.device
    gates = lt.gates
    i, f, g, o = (lt.in_steps(gates[k]).detach() for k in ("i", "f", "g", "o"))  # (B, T, H)
    c = lt.in_steps(lt.c).detach()
    c_prev = lt.prev_c.detach()
    tc = torch.tanh(c)
    e = o * (1 - tc * tc)  # ∂(o ⊙ tanh c)/∂c, diagonal
    beta_o = tc * o * (1 - o)  # ∂(o ⊙ tanh c)/∂(pre-activation of o)
    # γ for the i, f, g blocks: ∂c_n/∂(pre-activations) / ... all multiply the same dc
    gamma = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], 2)  # (B,T,3,H)
    w = p.w_hh.detach().view(4, H, P)
    w_ifg, w_o = w[:3], w[3]  # (3, H, P), (H, P)
    w_hr = p.w_hr.detach() if p.w_hr is not None else None  # (P, H)
    e_s, f_s, beta_s, gamma_s = e.unbind(1), f.unbind(1), beta_o.unbind(1), gamma.unbind(1)

    N = {"c": H, "h": P, "full": P + H}[state]
    a_h = torch.zeros(B, N, P, dtype=dt, device=dev)
    a_c = torch.zeros(B, N, H, dtype=dt, device=dev)
    if state == "h":
        a_h.copy_(torch.eye(P, dtype=dt, device=dev))
    elif state == "c":
        a_c.copy_(torch.eye(H, dtype=dt, device=dev))
    else:
        a_h[:, :P].copy_(torch.eye(P, dtype=dt, device=dev))
        a_c[:, P:].copy_(torch.eye(H, dtype=dt, device=dev))
    dc = torch.empty(B, N, H, dtype=dt, device=dev)
    k_buf = torch.empty(B, H, P, dtype=dt, device=dev)
    j_full = torch.empty(B, N, N, dtype=dt, device=dev) if state == "full" else None

    def steps():
        nonlocal a_h, a_c
        for n in range(T - 1, -1, -1):
            dm = a_h if w_hr is None else a_h @ w_hr  # (B, N, H)
            torch.addcmul(a_c, dm, e_s[n].unsqueeze(1), out=dc)
            if state == "c":
                yield dc
            elif state == "h":
                yield a_h
            else:
                j_full[..., :P].copy_(a_h)
                j_full[..., P:].copy_(a_c)
                yield j_full
            if n == 0:
                break
            # K_n = Σ_{i,f,g} diag(γ) W: (B, 3, H, 1) · (3, H, P) summed over the blocks
            torch.sum(gamma_s[n].unsqueeze(-1) * w_ifg, dim=1, out=k_buf)
            new_h = (dm * beta_s[n].unsqueeze(1)) @ w_o  # (B, N, P): one shared GEMM
            a_h = torch.baddbmm(new_h, dc, k_buf)  # + dc K_n, batched
            a_c = dc * f_s[n].unsqueeze(1)

    direct = f if state == "c" else None
    return steps(), N, direct


def _gru_steps(lt: LayerTrace, p: LayerParams, state: str, nonlinearity: str):
    B, T, H = lt.h.shape
    dt, dev = lt.h.dtype, lt.h.device
    r, z, nn_ = (lt.in_steps(lt.gates[k]).detach() for k in ("r", "z", "n"))
    h_prev = lt.prev_h.detach()
    w = p.w_hh.detach().view(3, H, H)
    gh_n = h_prev @ w[2].t()  # W_hn h_{n−1} + b_hn, (B, T, H)
    if p.b_hh is not None:
        gh_n = gh_n + p.b_hh.detach()[2 * H:]
    dn = (1 - z) * (1 - nn_ * nn_)
    alpha = torch.stack([dn * gh_n * r * (1 - r), (h_prev - nn_) * z * (1 - z), dn * r], 2)
    alpha_s, z_s = alpha.unbind(1), z.unbind(1)
    a = torch.eye(H, dtype=dt, device=dev).expand(B, H, H).clone()
    m_buf = torch.empty(B, H, H, dtype=dt, device=dev)

    def steps():
        nonlocal a
        for n in range(T - 1, -1, -1):
            yield a
            if n == 0:
                break
            torch.sum(alpha_s[n].unsqueeze(-1) * w, dim=1, out=m_buf)  # indirect ∂h_n/∂h_{n−1}
            a = torch.baddbmm(a * z_s[n].unsqueeze(1), a, m_buf)

    return steps(), H, z


def _rnn_steps(lt: LayerTrace, p: LayerParams, state: str, nonlinearity: str):
    B, T, H = lt.h.shape
    dt, dev = lt.h.dtype, lt.h.device
    d_s = act_derivative(lt.in_steps(lt.h).detach(), nonlinearity).unbind(1)  # act'(pre_n)
    w = p.w_hh.detach()
    a = torch.eye(H, dtype=dt, device=dev).expand(B, H, H).clone()

    def steps():
        nonlocal a
        for n in range(T - 1, -1, -1):
            yield a
            if n == 0:
                break
            a = (a * d_s[n].unsqueeze(1)) @ w  # one shared GEMM (B·N, H) × (H, H)

    return steps(), H, None


_STEPPERS = {"lstm": _lstm_steps, "gru": _gru_steps, "rnn": _rnn_steps}


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
    next chunk (its neighbour in the sweep)."""
    B, S, N, _ = js.shape
    j64 = js.to(torch.float64)
    start = None if q0 is None else q0.unsqueeze(1).expand(B, S, *q0.shape[1:]).reshape(
        B * S, *q0.shape[1:])
    sigma, q = certified_spectral_norm(j64.reshape(B * S, N, N), start)
    spectral[:, sl] = sigma.view(B, S).cpu()
    frob[:, sl] = torch.linalg.matrix_norm(j64).cpu()
    if direct is not None:
        share[:, sl] = highway_energy_share(j64, direct[:, sl]).cpu()
    return q.view(B, S, *q.shape[1:])[:, 0]


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
    K, N, _ = x.shape
    k = min(BLOCK, N)
    s = x.abs().amax(dim=(-2, -1))  # (K,)
    finite = torch.isfinite(s) & (s > 0)
    safe = torch.where(finite, s, torch.ones_like(s))
    y = x / safe[:, None, None]
    y = torch.where(finite[:, None, None], y, torch.zeros_like(y))
    fro2 = (y * y).sum((-2, -1))  # ‖Y‖²_F = trace(G)
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
