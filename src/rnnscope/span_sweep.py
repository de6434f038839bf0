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

Range: a span Jacobian of a float32 model falls below float32's smallest number (~1e−45)
after a few hundred steps of a forgetting LSTM, long before float64's. So the adjoint rows of
each sample carry a power-of-two exponent E (J_n = 2^E · J̃_n): whenever a sample's largest
entry leaves [2^(minexp/2), 2^(maxexp/2)] of the dtype, its rows are multiplied by an exact
power of two and E absorbs it. Scaling by 2^k is exact, so J̃ holds the same bits a float64-range
computation would, and the norms and shares (float64) are exact down to float64's range; in a
normal range nothing is rescaled and every bit is as before. `.total` (keep="full") is
2^E·J̃ in the trace's dtype: the matrices the dtype can hold, zero where they underflow; its
norms are those of the stored matrices.

Shape legend: B batch, T steps, S steps in a chunk, H hidden, P = H_out, N reported state size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cells import CELLS
from .cells.layer_trace import LayerTrace
from .recurrent import LayerParams
from .results import highway_energy_share
from .spectral import NormQueue, scaled, spectral_norm_of_scaled, steps_per_chunk


STATES = {"lstm": ("c", "h", "full"), "gru": ("h",), "rnn": ("h",)}


@dataclass(frozen=True)
class SpanSweep:
    """What `span_jacobians` returns; every field is a detached CPU tensor.

    Attributes:
        total: (B, T, N, N) J_n in the trace's dtype, or None with keep="norms".
        direct: (B, T, N) float64 highway product (LSTM "c", GRU) or None.
        spectral, frobenius: (B, T) float64 norms of J_n (None with keep="jacobians").
        share: (B, T) float64 highway energy share, or None without a highway (or with
            keep="jacobians").
    """

    total: torch.Tensor | None
    direct: torch.Tensor | None
    spectral: torch.Tensor | None
    frobenius: torch.Tensor | None
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
            Jacobians at a time; "jacobians" returns `.total` and `.direct` alone (the norms
            None), for a caller that computes them later with `span_norms`.
        chunk_size: steps reduced to norms at once (None: `spectral.steps_per_chunk`).

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
    if keep not in ("full", "norms", "jacobians"):
        raise ValueError(f"keep must be 'full', 'norms' or 'jacobians'; got {keep!r}")
    if lt.lengths is not None:
        raise ValueError("span_jacobians does not handle a packed (variable-length) trace: a "
                         "carried step is not a cell step; use the dense sweep of "
                         "jacobians.cell_jacobians for PackedSequence inputs")
    # The trace caches these on first access, in the grad mode of that moment: build them in
    # the caller's mode, not under our no_grad, so the trace is left as a fresh one would be.
    _ = lt.gates, lt.prev_h, (lt.prev_c if kind == "lstm" else None)
    with torch.no_grad():
        steps, N, direct_steps = _sweep(lt, p, kind, state, nonlinearity)
        B = lt.h.shape[0]
        return _collect(steps, B, lt.h.shape[1], N, direct_steps, keep,
                        steps_per_chunk(B, N) if chunk_size is None else chunk_size,
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
    rescale = Rescale(dt, B, dev)

    def steps():
        """Yield (J̃_n (B, N, N), E (B,) int64) with J_n = 2^E · J̃_n, n = T−1 … 0."""
        nonlocal d
        for n in range(T - 1, -1, -1):
            if state == "c":  # the row is the total ∂/∂c_n, formed inside the step's VJP
                d_prev, _ = cell.step_vjp(w, per_step[n], d, fold=True, dc_total=j_buf)
                yield j_buf, rescale.E
            else:
                if state == "full":
                    torch.cat(d, dim=-1, out=j_buf)
                yield (d[0] if state == "h" else j_buf), rescale.E
                if n == 0:
                    break
                d_prev, _ = cell.step_vjp(w, per_step[n], d, fold=True)
            d = d_prev
            rescale(d)

    direct = None
    if kind == "gru":
        direct = saved.z
    elif kind == "lstm" and state == "c":
        direct = saved.f
    return steps(), N, direct


class Rescale:
    """Keeps each sample's adjoint rows inside its dtype's range by exact powers of two.

    `E` (B,) int64: the exponent the rows carry (true rows = 2^E · stored rows). Called on the
    rows after each step; a sample is rescaled only when its largest |entry| has a binary
    exponent outside [minexp/2, maxexp/2] (float32: about 1e−19 … 1e19), so in the usual range
    no work is done beyond one max per step. NaN/inf/zero rows are left alone."""

    def __init__(self, dtype, B: int, device):
        fi = torch.finfo(dtype)
        self.lo, self.hi = int(math.log2(fi.tiny)) // 2, int(math.log2(fi.max)) // 2
        self.limit = int(math.log2(fi.max)) - 2  # |shift| per step: 2^shift representable
        self.E = torch.zeros(B, dtype=torch.int64, device=device)

    def __call__(self, parts) -> None:
        m = parts[0].abs().amax(dim=(1, 2))
        for t in parts[1:]:
            m = torch.maximum(m, t.abs().amax(dim=(1, 2)))
        _, e = torch.frexp(m)  # m = mantissa · 2^e; e = 0 for 0, inf and nan
        e = e.to(torch.int64)
        off = (e < self.lo) | (e > self.hi)
        if not bool(off.any()):
            return
        shift = torch.where(off, -e, 0).clamp(-self.limit, self.limit)  # (B,)
        factor = torch.ldexp(torch.ones_like(m), shift).view(-1, 1, 1)  # 2^shift, exact
        for t in parts:
            t.mul_(factor)  # exact: a power of two
        self.E = self.E - shift


# ----------------------------------------------------------------------------------------------
# Collecting Jacobians and reducing them to norms chunk by chunk


def _collect(steps, B: int, T: int, N: int, direct_steps, keep: str, chunk: int, dtype,
             device) -> SpanSweep:
    direct = None
    if direct_steps is not None:  # ∏_{m=n+1}^{T−1} d_m: exclusive reverse cumulative product
        d64 = direct_steps.detach().to(torch.float64)
        rev = torch.cumprod(d64.flip(1), dim=1).flip(1)  # ∏_{m=n}^{T−1}
        direct = torch.cat([rev[:, 1:], torch.ones_like(rev[:, :1])], dim=1)
    if keep != "norms":  # the whole (B, T, N, N) is kept: norms after the sweep, if asked
        total = torch.empty(B, T, N, N, dtype=dtype, device=device)
        for n, (J, E) in zip(range(T - 1, -1, -1), steps):
            if bool(E.any()):  # 2^E · J̃ in the dtype (zero where it cannot hold it)
                J = torch.ldexp(J.to(torch.float64), E.view(-1, 1, 1).to(torch.float64))
            total[:, n].copy_(J)
        direct = direct.cpu() if direct is not None else None
        norms = (None, None, None) if keep == "jacobians" else span_norms(total, direct, chunk)
        return SpanSweep(total.cpu(), direct, *norms)
    buf = torch.empty(B, min(chunk, T), N, N, dtype=dtype, device=device)
    exps = torch.zeros(B, min(chunk, T), dtype=torch.int64, device=device)  # J = 2^E · J̃
    spectral = torch.empty(B, T, dtype=torch.float64)
    frob = torch.empty(B, T, dtype=torch.float64)
    share = torch.empty(B, T, dtype=torch.float64) if direct is not None else None
    chunk_stop = T
    with NormQueue() as queue:  # each chunk's eigensolves run while the next chunk is swept
        for n, (J, E) in zip(range(T - 1, -1, -1), steps):
            chunk_start = max(0, chunk_stop - chunk)
            buf[:, n - chunk_start].copy_(J)
            exps[:, n - chunk_start] = E
            if n == chunk_start:
                sl = slice(chunk_start, chunk_stop)
                S = chunk_stop - chunk_start
                _reduce(buf[:, :S], sl, spectral, frob, direct, share, exps[:, :S],
                        queue=queue)
                chunk_stop = chunk_start
    return SpanSweep(total=None, direct=direct.cpu() if direct is not None else None,
                     spectral=spectral, frobenius=frob, share=share)


def span_norms(total: torch.Tensor, direct: torch.Tensor | None, chunk: int | None = None):
    """(spectral, frobenius, share) (B, T) float64 of span Jacobians `total` (B, T, N, N) with
    highway products `direct` (B, T, N) or None (then share is None), `chunk` steps at a time
    in the order the sweep reduces them (from T−1 down), so that keep="norms", keep="full" and
    a `CellJacobians` whose norms are computed on first read agree bit for bit."""
    B, T = total.shape[:2]
    chunk = steps_per_chunk(B, total.shape[-1]) if chunk is None else chunk
    spectral = torch.empty(B, T, dtype=torch.float64)
    frob = torch.empty(B, T, dtype=torch.float64)
    share = torch.empty(B, T, dtype=torch.float64) if direct is not None else None
    for stop in range(T, 0, -chunk):
        sl = slice(max(0, stop - chunk), stop)
        _reduce(total[:, sl], sl, spectral, frob, direct, share)
    return spectral, frob, share


def _reduce(js: torch.Tensor, sl: slice, spectral, frob, direct, share,
            exps: torch.Tensor | None = None, queue: NormQueue | None = None) -> None:
    """Norms of a chunk of Jacobians J = 2^E · js (js (B, S, N, N), exps E (B, S) int64 or None
    for 0) for steps sl, written in place (the spectral norms when `queue` has solved them).

    One float64 copy, scaled as it is made (Y = js / max|js|, per matrix), serves all three: the
    spectral norm (`spectral.spectral_norm_of_scaled`), the Frobenius norm s·‖Y‖_F and the
    highway share, with s = 2^E · max|js| (float64)."""
    B, S, N, _ = js.shape
    y, s, finite = scaled(js.reshape(B * S, N, N))  # float64, read once from js
    e = None
    if exps is not None and bool(exps.any()):
        e = exps.reshape(B * S).to(torch.float64)
        s = torch.ldexp(s, e)  # exact, down to float64's range
    if queue is None:
        spectral[:, sl] = spectral_norm_of_scaled(y, s, finite).view(B, S).cpu()
    else:
        queue.put(y, s, finite, lambda norms: spectral[:, sl].copy_(norms.view(B, S)))
    # ‖J‖_F = s ‖Y‖_F; inf/nan for a non-finite J, 0 for J = 0 (as matrix_norm gives)
    fro2 = (y * y).sum((-2, -1))
    frob[:, sl] = torch.where(finite, fro2.sqrt() * s, s).view(B, S).cpu()
    if direct is not None:
        j = js.reshape(B * S, N, N)
        share[:, sl] = _share(j, y, s, finite, direct[:, sl].reshape(B * S, N),
                              e).view(B, S).cpu()


def _share(j: torch.Tensor, y: torch.Tensor, s: torch.Tensor, finite: torch.Tensor,
           d: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
    """`results.highway_energy_share(J, d)` for J = 2^e · j = s Y (K, N, N), d (K, N) float64,
    from the scaled copy already made: ‖D‖²_F / (‖D‖²_F + ‖J − D‖²_F) with both taken of
    (·)/s. Y's largest entry is 1, so the denominator cannot underflow; where |d| could
    overflow once scaled (|d| > 1e100 s), or J is 0 or non-finite, the general function takes
    over for those matrices alone (the others get the same bits as in a batch without them)."""
    dn = d / s.unsqueeze(-1)
    ok = finite & (dn.abs().amax(-1) <= 1e100)
    rest = y.clone()
    rest.diagonal(dim1=-2, dim2=-1).sub_(dn)
    rest2 = (rest * rest).sum((-2, -1))
    d2 = (dn * dn).sum(-1)
    out = d2 / (d2 + rest2)
    if not bool(ok.all()):
        idx = (~ok).nonzero()[:, 0]
        jj = j[idx] if e is None else torch.ldexp(j[idx].to(torch.float64),
                                                  e[idx].view(-1, 1, 1))
        out[idx] = highway_energy_share(jj, d[idx])
    return out
