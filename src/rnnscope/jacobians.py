"""Exact state gradients, the gradient-highway decomposition, Jacobian spectra, Lyapunov exponents.

Step numbering: n = 0..T−1 counts the steps of one direction's recurrence in the order it runs.
For direction 0, step n reads input position n; for direction 1 of a bidirectional layer the
recurrence runs backward in time, so step n reads position T−1−n (results carry `.positions`).
s_n is the state after step n, s_{−1} the initial state. With this numbering
`cell_jacobians(...).total[:, T−1]` is the identity for both directions.

Closed-form one-step Jacobians (rnnscope.cells) are used for nn.RNN/LSTM/GRU and their cells;
user-written cells (forward(x_t, state) -> new_state) go through torch.func autograd Jacobians.
Multi-layer modules: the Jacobians of layer l hold that layer's input (the output of layer
l − 1) fixed — they describe layer l's own recurrence.

Shape legend: B batch, T steps, N state size (H for RNN/GRU and LSTM "c"; H_out for LSTM "h";
H_out + H for LSTM "full"), k exponents.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import cells
from .cells import custom
from .checks import check_initial_state, check_inputs, count_nonfinite
from .profile import per_sample_loss
from .recurrent import describe, is_recurrent
from .replay import replay
from .results import (CellJacobians, StateGradientLayer, StateGradients, StepJacobians,
                      spectral_norm)
from .span_sweep import span_jacobians

CHUNK = 16  # steps of one-step Jacobians built at once in a sweep: bounds memory to O(CHUNK·B·N²)


# ----------------------------------------------------------------------------------------------
# Unrolling a module into a sequence of one-step Jacobians


@dataclass
class _Recurrence:
    """One layer/direction's recurrence, able to produce its one-step Jacobians in chunks.

    step(sl) -> (direct (B, S, N) or None, A (B, S, M, M)): the highway diagonal of the
    reported state and the one-step Jacobians of the *running* state (size M: the full (h, c)
    state for an LSTM, whose c or h alone is not Markov).
    The reported span Jacobian is J_n = R_n[:, rows] · U_n with R_n = A_{T−1} ⋯ A_{n+1}:
    `rows` selects the reported rows, and U_n maps a perturbation of the reported state into
    the running state — entry(sl) -> (B, S, P, H) E_n for LSTM "c" (U_n = [E_n; I]), the
    column selector `cols` for LSTM "h" (U = [I; 0]), identity otherwise.
    `positions` maps step n to its input position.
    """

    step: Callable
    B: int
    T: int
    N: int
    M: int
    state: str
    kind: str
    positions: torch.Tensor
    rows: slice | None = None
    cols: slice | None = None
    entry: Callable | None = None
    unbatched: bool = False
    closed: tuple | None = None  # (LayerTrace, LayerParams, nonlinearity) for the adjoint sweep


def _custom_cell_state0(cell: nn.Module, hx, B: int, like: torch.Tensor):
    if hx is not None:
        for t in custom.as_tuple(hx):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != B:
                raise ValueError(f"hx for a custom cell must be a (B={B}, N) tensor or a tuple of "
                                 f"them; got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        return hx
    size = getattr(cell, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{type(cell).__name__} has no integer `hidden_size`, so its initial "
                         "state cannot be made: pass hx (a tensor or a tuple of tensors)")
    return like.new_zeros(B, size)


def _custom_inputs(inputs) -> tuple[torch.Tensor, bool]:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point torch.Tensor; got "
                        f"{getattr(inputs, 'dtype', type(inputs).__name__)}")
    if inputs.dim() == 2:
        return inputs.unsqueeze(0), True
    if inputs.dim() != 3 or inputs.shape[1] == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs for a cell must be (B, T, I) or unbatched (T, I) with T ≥ 1; "
                         f"got {tuple(inputs.shape)}")
    return inputs, False


def _is_custom_cell(module) -> bool:
    return isinstance(module, nn.Module) and not is_recurrent(module) and not isinstance(
        module, (nn.RNNBase, nn.RNNCellBase))


def _recurrence(module, inputs, hx, *, layer, direction, state, method) -> _Recurrence:
    if method not in ("auto", "closed", "autograd"):
        raise ValueError(f"method must be 'auto', 'closed' or 'autograd'; got {method!r}")
    if _is_custom_cell(module) or method == "autograd":
        return _autograd_recurrence(module, inputs, hx, layer=layer, direction=direction,
                                    state=state)
    spec = describe(module)
    spec.check_layer(layer, direction)
    states = ("c", "h", "full") if spec.kind == "lstm" else ("h",)
    state = state or states[0]
    if state not in states:
        raise ValueError(f"state must be one of {states} for a {type(module).__name__}; "
                         f"got {state!r}")
    with torch.no_grad():
        tr = replay(module, inputs, hx)
    lt = tr.layers[layer][direction]
    p = spec.params(layer, direction)
    B, T = lt.h.shape[:2]
    P, H = spec.hidden_out, spec.hidden_size

    def step(sl):
        with torch.no_grad():
            if spec.kind == "rnn":
                return cells.rnn.step_jacobians(p, lt, sl, nonlinearity=spec.nonlinearity)
            if spec.kind == "gru":
                z, ind = cells.gru.step_jacobians(p, lt, sl)
                return z, ind + torch.diag_embed(z)
            full = cells.lstm.step_jacobians(p, lt, sl)
            return (lt.in_steps(lt.gates["f"])[:, sl] if state == "c" else None), full

    def entry(sl):
        with torch.no_grad():
            return cells.lstm.output_jacobian(p, lt, sl)

    positions = torch.arange(T - 1, -1, -1) if direction == 1 else torch.arange(T)
    closed = (lt, p, spec.nonlinearity)
    if spec.kind != "lstm":
        return _Recurrence(step, B, T, H, H, state, spec.kind, positions,
                           unbatched=tr.unbatched, closed=closed)
    N = {"c": H, "h": P, "full": P + H}[state]
    rows = {"c": slice(P, P + H), "h": slice(0, P), "full": None}[state]
    return _Recurrence(step, B, T, N, P + H, state, "lstm", positions, rows=rows,
                       cols=slice(0, P) if state == "h" else None,
                       entry=entry if state == "c" else None, unbatched=tr.unbatched,
                       closed=closed)


def _autograd_recurrence(module, inputs, hx, *, layer, direction, state):
    """Autograd (torch.func) one-step Jacobians of a cell, built-in or user-written."""
    if isinstance(module, nn.RNNBase):
        raise ValueError("method='autograd' works on cells (nn.LSTMCell, a custom cell); for a "
                         f"fused {type(module).__name__} use method='closed' (torch.func cannot "
                         "differentiate through fused RNN kernels)")
    if layer != 0 or direction != 0:
        raise ValueError(f"a cell has one layer and one direction; got layer={layer}, "
                         f"direction={direction}")
    if is_recurrent(module):
        spec = describe(module)
        x, unbatched = check_inputs(spec, inputs)
        h0, c0 = check_initial_state(spec, hx, x.shape[0], unbatched, x)
        state0 = (h0[0], c0[0]) if spec.kind == "lstm" else h0[0]
        kind = spec.kind
        allowed = ("full",) if kind == "lstm" else ("h",)
    else:
        x, unbatched = _custom_inputs(inputs)
        state0 = _custom_cell_state0(module, hx, x.shape[0], x)
        kind = "custom"
        allowed = ("full",)
    state = state or allowed[0]
    if state not in allowed:
        raise ValueError(f"the autograd path differentiates the whole flattened state; state "
                         f"must be one of {allowed}; got {state!r}")
    with torch.no_grad():
        states = custom.run(module, x, state0)
    prev = [state0] + states[:-1]
    N = custom.flatten_state(state0).shape[-1]

    def step(sl):
        idx = range(*sl.indices(len(prev)))
        return None, custom.step_jacobians(module, x[:, sl], [prev[i] for i in idx])

    return _Recurrence(step, x.shape[0], x.shape[1], N, N, state, kind,
                       torch.arange(x.shape[1]), unbatched=unbatched)


# ----------------------------------------------------------------------------------------------
# Public functions


def step_jacobians(module: nn.Module, inputs: torch.Tensor, hx=None, *, layer: int = 0,
                   direction: int = 0, state: str | None = None,
                   method: str = "auto") -> StepJacobians:
    """The exact one-step Jacobians ∂s_n/∂s_{n−1}, split into the highway and the rest.

    `.direct` (B, T, N) is the diagonal highway — f_n for the LSTM cell state, z_n for the GRU,
    None for a vanilla RNN or a full/custom state — and `.indirect` (B, T, N, N) everything
    else, so `.total = diag(direct) + indirect` exactly. This is the seed's
    `decompose_gradient_paths`, computed exactly instead of "simplified". At step 0 the LSTM
    "c" Jacobian is diag(f_0): the initial h0 is an input, not a function of c0.

    Args:
        state: LSTM "c" (default; h_{n−1} = o_{n−1}·tanh(c_{n−1}) moves with c_{n−1}), "h"
            (∂h_n/∂h_{n−1} with c_{n−1} held fixed) or "full" ((h, c) stacked); RNN/GRU "h".
        method: "auto", "closed" (analytic) or "autograd" (torch.func; cells only).
    """
    rec = _recurrence(module, inputs, hx, layer=layer, direction=direction, state=state,
                      method=method)
    direct, a = rec.step(slice(0, rec.T))
    total = a if rec.rows is None else a[..., rec.rows, :]
    if rec.cols is not None:
        total = total[..., rec.cols]
    elif rec.entry is not None:  # LSTM "c": ∂c_n/∂c_{n−1} = [0 I] F_n [E_{n−1}; I]
        e = rec.entry(slice(0, rec.T))  # (B, T, P, H)
        e_prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        P = e.shape[-2]
        total = total[..., :P] @ e_prev + total[..., P:]
    indirect = total - torch.diag_embed(direct) if direct is not None else total
    return StepJacobians(_cpu(direct), _cpu(indirect), rec.state, rec.kind, layer, direction,
                         rec.positions)


def _sweep(rec: _Recurrence):
    """Yield (n, J_n, d_n) for n = T−1 down to 0: J_n = ∂s_{T−1}/∂s_n in the reported state
    (B, N, N) and d_n the one-step highway diagonal (B, N) or None.

    Holds only the running product R (B, rows, M) and one chunk of one-step Jacobians.
    """
    R = None
    for start in range(((rec.T - 1) // CHUNK) * CHUNK, -1, -CHUNK):
        sl = slice(start, min(start + CHUNK, rec.T))
        d_chunk, a_chunk = rec.step(sl)
        e_chunk = rec.entry(sl) if rec.entry is not None else None
        if R is None:
            eye = torch.eye(rec.M, dtype=a_chunk.dtype, device=a_chunk.device)
            R = (eye if rec.rows is None else eye[rec.rows]).expand(rec.B, -1, -1)
        for j in range(sl.stop - sl.start - 1, -1, -1):
            if rec.cols is not None:
                J = R[..., rec.cols]
            elif e_chunk is not None:
                P = e_chunk.shape[-2]
                J = R[..., :P] @ e_chunk[:, j] + R[..., P:]
            else:
                J = R
            yield sl.start + j, J, (d_chunk[:, j] if d_chunk is not None else None)
            R = R @ a_chunk[:, j]  # now ∂s_{T−1}/∂(running state)_{n−1}


def cell_jacobians(module: nn.Module, inputs: torch.Tensor, hx=None, *, layer: int = 0,
                   direction: int = 0, state: str | None = None, keep: str = "full",
                   method: str = "auto") -> CellJacobians:
    """Exact Jacobians of the final state with respect to every earlier state.

    J[b, n] = ∂s_{T−1}/∂s_n for n = 0..T−1 (J[:, T−1] = I), accumulated in one reverse sweep
    J_n = J_{n+1} · A_{n+1} over closed-form one-step Jacobians A.

    Args:
        state: as in `step_jacobians`. For the LSTM cell state, J holds the direct path (the
            product of forget gates) AND every indirect path through h and the next gates.
        keep: "full" keeps `.total` (B, T, N, N); "norms" keeps only per-step norms, shares and
            the direct path, holding O(B·N²) memory for the running product.

    Returns:
        `CellJacobians` with `.direct` (B, T, N) = ∏_{m=n+1}^{T−1} f_m (LSTM "c") or z_m (GRU),
        None otherwise; `.spectral_norm()` (B, T); `.highway_share()` (B, T).
    """
    if keep not in ("full", "norms"):
        raise ValueError(f"keep must be 'full' or 'norms'; got {keep!r}")
    rec = _recurrence(module, inputs, hx, layer=layer, direction=direction, state=state,
                      method=method)
    if rec.closed is not None and rec.closed[0].lengths is None:  # closed-form adjoint sweep
        lt, p, nonlinearity = rec.closed
        sw = span_jacobians(lt, p, kind=rec.kind, state=rec.state, nonlinearity=nonlinearity,
                            keep=keep)
        bad = count_nonfinite(sw.spectral)
        if bad:
            warnings.warn(f"cell_jacobians: {bad} non-finite Jacobian norm(s)", RuntimeWarning,
                          stacklevel=2)
        return CellJacobians(total=sw.total, direct=sw.direct, spectral=sw.spectral,
                             frobenius=sw.frobenius, share=sw.share, state=rec.state,
                             kind=rec.kind, layer=layer, direction=direction,
                             positions=rec.positions, nonfinite=bad)
    B, T = rec.B, rec.T
    totals = [None] * T if keep == "full" else None
    spectral = torch.empty(B, T, dtype=torch.float64)
    frob = torch.empty(B, T, dtype=torch.float64)
    direct = share = running = None
    for n, J, d in _sweep(rec):
        J64 = J.to(torch.float64)
        spectral[:, n] = spectral_norm(J64).cpu()
        frob[:, n] = torch.linalg.matrix_norm(J64).cpu()
        if totals is not None:
            totals[n] = J.detach().cpu()
        if d is not None:
            if running is None:
                running = torch.ones_like(d, dtype=torch.float64)  # ∏_{m>n} d_m, from m = T−1
                direct = torch.empty(B, T, d.shape[-1], dtype=torch.float64)
                share = torch.empty(B, T, dtype=torch.float64)
            direct[:, n] = running.cpu()
            # energy share of the direct path: ‖D‖² / (‖D‖² + ‖J − D‖²)
            d2 = (running ** 2).sum(-1)
            rest2 = ((J64 - torch.diag_embed(running)) ** 2).sum((-2, -1))
            share[:, n] = torch.where(d2 + rest2 > 0, d2 / (d2 + rest2),
                                      torch.full_like(d2, math.nan)).cpu()
            running = running * d.to(torch.float64)
    total = torch.stack(totals, 1) if totals is not None else None
    bad = count_nonfinite(spectral)
    if bad:
        warnings.warn(f"cell_jacobians: {bad} non-finite Jacobian norm(s)", RuntimeWarning,
                      stacklevel=2)
    return CellJacobians(total=total, direct=direct, spectral=spectral, frobenius=frob,
                         share=share, state=rec.state, kind=rec.kind, layer=layer,
                         direction=direction, positions=rec.positions, nonfinite=bad)


def lyapunov_spectrum(module: nn.Module, inputs: torch.Tensor, hx=None, *, layer: int = 0,
                      direction: int = 0, k: int | None = None, warmup: int = 0,
                      method: str = "auto") -> torch.Tensor:
    """The k largest Lyapunov exponents of the state recurrence along the input-driven
    trajectory, by the QR method on the one-step Jacobians.

    Exponents are in natural log per step (divide by ln 2 for bits per step, as some papers
    report). The state is the full recurrent state: (h, c) for an LSTM (N = H_out + H), h for
    RNN/GRU, the flattened state for a custom cell. The first `warmup` steps evolve the
    orthonormal frame without being counted.

    Returns:
        (B, k) float64, sorted descending per sample ((k,) for unbatched inputs).
    """
    spec_kind_state = None if _is_custom_cell(module) else (
        "full" if describe(module).kind == "lstm" else "h")
    rec = _recurrence(module, inputs, hx, layer=layer, direction=direction,
                      state=spec_kind_state, method=method)
    B, T, N = rec.B, rec.T, rec.N
    k = N if k is None else k
    if not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N={N}] (the state size); got {k!r}")
    if not isinstance(warmup, int) or not 0 <= warmup < T:
        raise ValueError(f"warmup must be an int in [0, T={T}); got {warmup!r}")
    Q = None
    logs = torch.zeros(B, k, dtype=torch.float64)
    for start in range(0, T, CHUNK):
        sl = slice(start, min(start + CHUNK, T))
        _, a_chunk = rec.step(sl)
        a_chunk = a_chunk.to(torch.float64)
        if Q is None:
            Q = torch.eye(N, k, dtype=torch.float64, device=a_chunk.device).expand(B, N, k)
        for j in range(a_chunk.shape[1]):
            Q, R = torch.linalg.qr(a_chunk[:, j] @ Q)
            if start + j >= warmup:
                logs += torch.diagonal(R, dim1=-2, dim2=-1).abs().log().cpu()
    exps = (logs / (T - warmup)).sort(dim=-1, descending=True).values
    return exps[0] if rec.unbatched else exps


def state_gradients(module: nn.Module, inputs: torch.Tensor, hx=None, *, loss="last",
                    keep: str = "norms") -> StateGradients:
    """Exact total gradients ∂L/∂h_t and (LSTM) ∂L/∂c_t for every layer, direction and step.

    "Total" means everything that reaches the state: the gradient injected at its own output
    step plus all that flows back through the recurrence and the layers above. Taken in one
    backward of the replay with respect to the per-step state tensors themselves; the module's
    parameters and their .grad are not touched.

    Args:
        loss: as in `gradient_profile`: "last", "all" or a callable(outputs (B, T, F)) -> (B,).
            Outputs are the module's output sequence, batch-major.
        keep: "norms" keeps (B, T) norms; "full" also keeps the gradient tensors.
    """
    if keep not in ("full", "norms"):
        raise ValueError(f"keep must be 'full' or 'norms'; got {keep!r}")
    if _is_custom_cell(module):
        return _custom_state_gradients(module, inputs, hx, loss=loss, keep=keep)
    spec = describe(module)
    packed = isinstance(inputs, PackedSequence)
    if packed:
        inputs = PackedSequence(inputs.data.detach().requires_grad_(True), inputs.batch_sizes,
                                inputs.sorted_indices, inputs.unsorted_indices)
    else:
        check_inputs(spec, inputs)
        inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        # Inputs that require grad guarantee a graph even if no parameter requires grad.
        tr = replay(module, inputs, hx)
        top = tr.layers[-1]
        seq = top[0].h if len(top) == 1 else torch.cat([t.h for t in top], -1)  # (B, T, F)
        if packed and loss == "last":  # each sequence's own last valid step
            valid = top[0].valid
            seq = seq * valid.unsqueeze(-1).to(seq)  # the module's output is 0 past the end
            idx = (valid.sum(1) - 1).clamp_min(0)
            losses = seq[torch.arange(seq.shape[0]), idx].sum(-1)
        else:
            if packed:
                seq = seq * top[0].valid.unsqueeze(-1).to(seq)
            losses = per_sample_loss(seq, loss, seq.shape[0])
        return trace_state_gradients(tr, [losses.sum()], keep=keep, loss=_loss_name(loss))


def trace_state_gradients(trace, outputs: list, grad_outputs: list | None = None, *,
                          keep: str = "norms", loss: str = "custom") -> StateGradients:
    """Total state gradients of a replay `trace` from one backward of `outputs` (weighted by
    `grad_outputs`, as in torch.autograd.grad) taken w.r.t. the per-step state tensors.

    Shared by `state_gradients` (outputs = [Σ_s L_s]) and the GradientMonitor (outputs = the
    replayed output and final states, grad_outputs = the gradients the real loss sent them).
    A state the backward never reaches gets gradient zero.
    """
    targets = [t for dirs in trace.layers for lt in dirs
               for t in lt.steps_h + (lt.steps_c or ())]
    grads = (torch.autograd.grad(outputs, targets, grad_outputs, allow_unused=True)
             if outputs else [None] * len(targets))
    it = iter(_zeros_if_none(grads, targets))
    layers = []
    for dirs in trace.layers:
        row = []
        for lt in dirs:
            gh = [next(it) for _ in lt.steps_h]
            gc = [next(it) for _ in lt.steps_c] if lt.steps_c is not None else None
            row.append(_gradient_layer(gh, gc, lt.reverse, keep))
        layers.append(tuple(row))
    return StateGradients(tuple(layers), loss)


def _loss_name(loss) -> str:
    return "custom" if callable(loss) else str(loss)


def _zeros_if_none(grads, targets):
    """A state the loss never reaches (allow_unused) has gradient zero, not None."""
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets)]


def _gradient_layer(gh, gc, reverse, keep) -> StateGradientLayer:
    """Per-step gradients in processing order -> (B, T) norms in position order."""

    def stack(gs):
        return torch.stack(gs[::-1] if reverse else gs, dim=1).detach()  # (B, T, ·)

    h = stack(gh)
    c = stack(gc) if gc is not None else None
    norm = lambda t: t.to("cpu", torch.float64).norm(dim=-1)  # noqa: E731
    h_norm, c_norm = norm(h), (norm(c) if c is not None else None)
    # a NaN/Inf value makes its norm non-finite: count values only when some norm is
    bad = sum(count_nonfinite(t) for t, n in ((h, h_norm), (c, c_norm))
              if n is not None and not torch.isfinite(n).all())
    return StateGradientLayer(h=h_norm, c=c_norm, h_full=h.cpu() if keep == "full" else None,
                              c_full=c.cpu() if c is not None and keep == "full" else None,
                              nonfinite=bad)


def _custom_state_gradients(cell, inputs, hx, *, loss, keep) -> StateGradients:
    x, _ = _custom_inputs(inputs)
    state0 = _custom_cell_state0(cell, hx, x.shape[0], x)
    with torch.enable_grad():
        states = custom.run(cell, x, state0)
        seq = torch.stack([custom.as_tuple(s)[0] for s in states], 1)  # first component (B,T,·)
        losses = per_sample_loss(seq, loss, seq.shape[0])
        flat = [t for s in states for t in custom.as_tuple(s)]
        grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True)
    n = len(custom.as_tuple(states[0]))
    grads = _zeros_if_none(grads, flat)
    per_comp = [grads[i::n] for i in range(n)]
    gh = per_comp[0]
    gc = per_comp[1] if n > 1 else None
    return StateGradients(((_gradient_layer(gh, gc, False, keep),),), _loss_name(loss))


def _cpu(t):
    return None if t is None else t.detach().to("cpu")
