"""Exact state gradients, the gradient-highway decomposition, Jacobian spectra, Lyapunov exponents.

Step numbering: n = 0..T−1 counts the steps of one direction's recurrence in the order it runs.
For direction 0, step n reads input position n; for direction 1 of a bidirectional layer the
recurrence runs backward in time, so step n reads position T−1−n (results carry `.positions`).
s_n is the state after step n, s_{−1} the initial state. With this numbering
`cell_jacobians(...).total[:, T−1]` is the identity for both directions.

PackedSequence inputs: sample b's recurrence runs over its own steps only (direction 0: n <
length_b; direction 1: n ≥ T − length_b), and the replay carries its state unchanged through
the others. Those steps are not measured: nan in per-sample results (`.valid` False), left out
of every mean, and the span Jacobians end at each sample's own last step.

Non-finite values (a NaN/Inf in the inputs, the initial state or the weights) never reach a
linear-algebra solver: the affected samples are flagged (`.nonfinite`), their values are nan,
a RuntimeWarning gives their number, and the other samples are computed exactly as without them.

Closed-form one-step Jacobians (rnnscope.cells) are used for nn.RNN/LSTM/GRU and their cells;
user-written cells (forward(x_t, state) -> new_state) go through torch.func autograd Jacobians.
Multi-layer modules: the Jacobians of layer l hold that layer's input (the output of layer
l − 1) fixed — they describe layer l's own recurrence.
Decay recurrences (rnnscope.modern.protocol: minGRU, minLSTM, LRU, RG-LRU, the selective SSM,
sLSTM, or a user's module implementing the protocol) dispatch to modern/analyses.py: closed
forms from the decays when linear in the state (CellJacobians.highway_is_whole), the
closed-form full step Jacobians through the sweeps below otherwise.

Shape legend: B batch, T steps, N state size (H for RNN/GRU and LSTM "c"; H_out for LSTM "h";
H_out + H for LSTM "full"), k exponents.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import cells, stream
from .cells import custom
from .checks import check_initial_state, check_inputs, public
from .options import Keep, Loss, Method, State
from .profile import per_sample_loss
from .recurrent import check_subclass, describe, is_recurrent
from .replay import Trace, check_replayable, replay
from .results import (CellJacobians, Deferred, LyapunovSpectrum, StateGradientLayer,
                      StateGradients, StepJacobians, highway_energy_share)
from .span_sweep import Rescale, span_jacobians, span_norms
from .spectral import NormQueue, scaled, spectral_norms, steps_per_chunk
from .state_sweep import (can_sweep, gradient_layer, swept_state_gradients_from_loss,
                          top_sequence)
from .modern import analyses as decay
from .modern.protocol import describe_decay, is_decay_recurrence


def _chunk(chunk_size: int | None, rec: _Recurrence) -> int:
    """The chunk_size= option of the public functions: steps of one-step Jacobians built at
    once, memory O(chunk·B·M²). None: `spectral.steps_per_chunk` (64 steps while a chunk of
    the B (M, M) Jacobians stays within 32 MiB in float64, fewer for large states)."""
    return steps_per_chunk(rec.B, rec.M) if chunk_size is None else chunk_size


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
    `positions` maps step n to its input position. `valid` (B, T) bool, processing order, on
    the computing device, marks the steps each sample's sequence has (packed inputs; None when
    all are valid). At an invalid step the state is carried unchanged, so step() returns the
    identity there (and direct 1, entry 0): products over a span then equal the product over
    the sample's own steps. Consumers report invalid steps as nan.
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
    valid: torch.Tensor | None = None
    closed: tuple | None = None  # (LayerTrace, LayerParams, nonlinearity) for the adjoint sweep
    # LSTM "c" without projection, unpacked: c_steps(sl, e_before) -> (f, indirect, e_last),
    # the one-step Jacobians split without the full-state matrices (`cells.lstm.cell_state_steps`)
    c_steps: Callable | None = None

    @property
    def valid_cpu(self) -> torch.Tensor | None:
        return None if self.valid is None else self.valid.cpu()


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
    if is_decay_recurrence(module):  # modern/protocol.py: closed-form full step Jacobians
        return _decay_recurrence(module, inputs, hx, layer=layer, direction=direction,
                                 state=state, method=method)
    given = module if isinstance(module, Trace) else None
    if given is not None and method == "autograd":
        raise ValueError("method='autograd' runs the module itself; pass (module, inputs, hx) "
                         "instead of a Trace")
    if given is None and (_is_custom_cell(module) or method == "autograd"):
        return _autograd_recurrence(module, inputs, hx, layer=layer, direction=direction,
                                    state=state)
    spec = given.spec if given is not None else describe(module)
    module = spec.module
    spec.check_layer(layer, direction)
    states = ("c", "h", "full") if spec.kind == "lstm" else ("h",)
    state = state or states[0]
    if state not in states:
        raise ValueError(f"state must be one of {states} for a {type(module).__name__}; "
                         f"got {state!r}")
    if given is not None:
        tr = given
    else:
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

    valid = None
    if lt.valid is not None and not bool(lt.valid.all()):
        valid = lt.in_steps(lt.valid)  # (B, T) processing order
        step, entry = _carried(step, valid), _carried_entry(entry, valid)
    positions = torch.arange(T - 1, -1, -1) if direction == 1 else torch.arange(T)
    # The adjoint sweep (span_sweep) covers unpacked traces; packed ones take the dense sweep,
    # which makes carried steps the identity.
    closed = (lt, p, spec.nonlinearity) if valid is None else None
    if spec.kind != "lstm":
        return _Recurrence(step, B, T, H, H, state, spec.kind, positions,
                           unbatched=tr.unbatched, valid=valid, closed=closed)
    N = {"c": H, "h": P, "full": P + H}[state]
    rows = {"c": slice(P, P + H), "h": slice(0, P), "full": None}[state]
    c_steps = None
    if state == "c" and valid is None and p.w_hr is None:
        def c_steps(sl, e_before):
            with torch.no_grad():
                return cells.lstm.cell_state_steps(p, lt, sl, e_before)
    return _Recurrence(step, B, T, N, P + H, state, "lstm", positions, rows=rows,
                       cols=slice(0, P) if state == "h" else None,
                       entry=entry if state == "c" else None, unbatched=tr.unbatched,
                       valid=valid, closed=closed, c_steps=c_steps)


def _decay_spec(module, *, layer, direction, state, method):
    """The DecaySpec of a module implementing the decay-recurrence protocol, options checked."""
    spec = describe_decay(module)
    if layer != 0 or direction != 0:
        raise ValueError(f"a {type(module).__name__} has one layer and one direction; got "
                         f"layer={layer}, direction={direction}")
    if state not in (None, spec.state):
        raise ValueError(f"state must be {spec.state!r} for a {type(module).__name__}; "
                         f"got {state!r}")
    if method not in ("auto", "closed"):
        raise ValueError(f"a {type(module).__name__} is measured by its closed-form decays; "
                         f"method must be 'auto' or 'closed'; got {method!r}")
    return spec


def _decay_recurrence(module, inputs, hx, *, layer, direction, state, method) -> _Recurrence:
    """A nonlinear decay recurrence (sLSTM) as a _Recurrence over its closed-form full step
    Jacobians (the linear ones never get here: their analyses are closed forms)."""
    spec = _decay_spec(module, layer=layer, direction=direction, state=state, method=method)
    step, B, T, M, unbatched = decay.nonlinear_steps(spec, inputs, hx)
    return _Recurrence(step, B, T, M, M, spec.state, spec.kind, torch.arange(T),
                       unbatched=unbatched)


def _carried(step: Callable, valid: torch.Tensor) -> Callable:
    """step() with the identity (direct 1) at the steps a sample's sequence does not have:
    there the replay carries the state unchanged (s_n = s_{n−1})."""

    def masked(sl):
        d, a = step(sl)
        v = valid[:, sl]  # (B, S)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = torch.where(v[..., None, None], a, eye)
        if d is not None:
            d = torch.where(v.unsqueeze(-1), d, torch.ones((), dtype=d.dtype, device=d.device))
        return d, a

    return masked


def _carried_entry(entry: Callable, valid: torch.Tensor) -> Callable:
    """E_n = ∂h_n/∂c_n is 0 at a carried step: the state there is the initial (h0, c0) carried
    (direction 1 before the sequence starts), and h0 is an input, not a function of c0."""

    def masked(sl):
        e = entry(sl)
        return torch.where(valid[:, sl][..., None, None], e, torch.zeros((), dtype=e.dtype))

    return masked


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


def _warn_nonfinite(fn: str, bad: torch.Tensor) -> None:
    k = int(bad.sum())
    if k:
        warnings.warn(f"{fn}: {k} of {bad.numel()} sample(s) have non-finite Jacobians (NaN/Inf "
                      "in their inputs, states or the weights); their values are nan and the "
                      "summaries leave them out", RuntimeWarning, stacklevel=3)


def _reported_steps(rec: _Recurrence, sl: slice, e_last):
    """The reported one-step Jacobians of the steps in `sl`: (direct (B, S, N) or None, total
    (B, S, N, N), the last entry Jacobian E of the chunk for the next one (LSTM "c") or None).
    `e_last` is E of the step before the chunk (None at step 0)."""
    direct, a = rec.step(sl)
    total = a if rec.rows is None else a[..., rec.rows, :]
    if rec.cols is not None:
        total = total[..., rec.cols]
    elif rec.entry is not None:  # LSTM "c": ∂c_n/∂c_{n−1} = [0 I] F_n [E_{n−1}; I]
        e = rec.entry(sl)  # (B, S, P, H)
        first = torch.zeros_like(e[:, :1]) if e_last is None else e_last.unsqueeze(1)
        e_prev = torch.cat([first, e[:, :-1]], dim=1)
        P = e.shape[-2]
        total = total[..., :P] @ e_prev + total[..., P:]
        return direct, total, e[:, -1]
    return direct, total, None


def _per_sample_bad(finite_steps: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B,) bool: samples with a non-finite value at one of their valid steps.
    finite_steps (B, T) bool."""
    bad = ~finite_steps
    if valid is not None:
        bad &= valid
    return bad.any(1)


def _unmeasured(valid: torch.Tensor | None, bad: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool: entries reported as nan — steps a sequence does not have, and every step
    of a non-finite sample."""
    out = bad.unsqueeze(1).expand(-1, T).clone()
    if valid is not None:
        out |= ~valid
    return out


@public("step_jacobians", module=True, ints={"layer": 0, "direction": 0, "chunk_size": 1})
def step_jacobians(module: nn.Module | Trace, inputs=None, hx=None, *, layer: int = 0,
                   direction: int = 0, state: State | None = None, keep: Keep = "norms",
                   method: Method = "auto", chunk_size: int | None = None) -> StepJacobians:
    """The exact one-step Jacobians ∂s_n/∂s_{n−1}, split into the highway and the rest.

    `.direct` (B, T, N) is the diagonal highway — f_n for the LSTM cell state, z_n for the GRU,
    None for a vanilla RNN or a full/custom state — and `.indirect` (B, T, N, N) everything
    else, so `.total = diag(direct) + indirect` exactly. This is the classic LSTM gradient-flow
    analysis's `decompose_gradient_paths`, computed exactly instead of "simplified". At step 0
    the LSTM "c" Jacobian is diag(f_0): the initial h0 is an input, not a function of c0.

    Args:
        module: the recurrent module, or a `Trace` from `replay` (then inputs and hx are not
            given): one replay serves every analysis of it.
        inputs: a tensor in the module's layout, or a PackedSequence: steps past a sequence's
            end are not measured (nan, `.valid` False) and left out of `summary()`.
        state: LSTM "c" (default; h_{n−1} = o_{n−1}·tanh(c_{n−1}) moves with c_{n−1}), "h"
            (∂h_n/∂h_{n−1} with c_{n−1} held fixed) or "full" ((h, c) stacked); RNN/GRU "h".
        keep: "norms" (default) keeps only `.direct` and the per-step ‖indirect‖₂ (B, T),
            streaming over time in chunks with memory O(B·T·N + chunk_size·B·N²); "full" also
            keeps `.indirect` (B, T, N, N), so that `.total` can be formed.
        method: "auto", "closed" (analytic) or "autograd" (torch.func; cells only).
        chunk_size: steps whose one-step Jacobians are built at once (None: up to 64, fewer
            for large states; `spectral.steps_per_chunk`). Results agree whatever its value
            (to rounding); memory grows with it.

    Example:
        >>> lstm, x = nn.LSTM(3, 4, batch_first=True), torch.randn(2, 5, 3)
        >>> sj = step_jacobians(lstm, x, keep="full")
        >>> sj.direct.shape, sj.indirect.shape  # f_n (B, T, H) and the rest (B, T, H, H)
        (torch.Size([2, 5, 4]), torch.Size([2, 5, 4, 4]))
        >>> f = rnnscope.replay(lstm, x).layers[0][0].gates["f"]
        >>> assert torch.allclose(sj.direct, f.detach().to(sj.direct.dtype))

    A sample whose Jacobians hold a NaN/Inf (non-finite inputs, states or weights) is flagged
    in `.nonfinite` (B,), all its values are nan, and a RuntimeWarning gives the count; the
    other samples are computed exactly as without it.
    """
    if keep not in ("full", "norms"):
        raise ValueError(f"keep must be 'full' or 'norms'; got {keep!r}")
    if is_decay_recurrence(module) and _decay_spec(module, layer=layer, direction=direction,
                                                   state=state, method=method).linear:
        return decay.step_jacobians(describe_decay(module), inputs, hx, keep=keep)
    rec = _recurrence(module, inputs, hx, layer=layer, direction=direction, state=state,
                      method=method)
    T, chunk = rec.T, _chunk(chunk_size, rec)
    directs, kept, finite = [], [], []
    e_last = None
    spec = torch.empty(rec.B, T, dtype=torch.float64) if keep == "norms" else None
    with NormQueue() as queue:  # each chunk's eigensolves run while the next one is built
        for start in range(0, T, chunk):
            sl = slice(start, min(start + chunk, T))
            if rec.c_steps is not None:  # the split form, no (P+H)² matrices
                direct, indirect, e_last = rec.c_steps(sl, e_last)
            else:
                direct, total, e_last = _reported_steps(rec, sl, e_last)
                indirect = total - torch.diag_embed(direct) if direct is not None else total
            if keep == "full":
                kept.append(indirect.detach().cpu())
                ok = torch.isfinite(indirect.abs().amax(dim=(-2, -1)))  # (B, S); keeps nan
            else:
                # one batched Gram + eigvalsh for the chunk's B·S matrices; nan/inf for a
                # non-finite matrix (spectral.py: exact to float64 rounding), as s is
                B, S = indirect.shape[:2]
                y, s, fin = scaled(indirect.detach().reshape(B * S, *indirect.shape[2:]))
                queue.put(y, s, fin, lambda v, sl=sl, B=B, S=S: spec[:, sl].copy_(v.view(B, S)))
                ok = torch.isfinite(s).view(B, S)
            if direct is not None:
                ok &= torch.isfinite(direct).all(-1)
                directs.append(direct.detach().cpu())
            finite.append(ok.cpu())
    valid = rec.valid_cpu
    bad = _per_sample_bad(torch.cat(finite, 1), valid)
    off = _unmeasured(valid, bad, T)  # (B, T)
    direct = torch.cat(directs, 1).masked_fill_(off.unsqueeze(-1), math.nan) if directs else None
    indirect = None
    if keep == "full":
        indirect = torch.cat(kept, 1).masked_fill_(off[..., None, None], math.nan)
    else:
        spec.masked_fill_(off, math.nan)
    _warn_nonfinite("step_jacobians", bad)
    return StepJacobians(direct, indirect, rec.state, rec.kind, layer, direction,
                         rec.positions, valid=valid, nonfinite=bad, indirect_spectral=spec)


def _sweep(rec: _Recurrence, chunk: int):
    """Yield (n, J̃_n, E, d_n) for n = T−1 down to 0: J_n = 2^E · J̃_n = ∂s_{T−1}/∂s_n in the
    reported state (B, N, N), E (B,) int64, and d_n the one-step highway diagonal (B, N) or
    None.

    Holds only the running product R (B, rows, M) and one chunk of one-step Jacobians. R is
    kept in its dtype's range by exact powers of two per sample (`span_sweep.Rescale`), so a
    float32 product does not underflow to 0 after a few hundred steps.
    """
    R = None
    rescale = None
    for start in range(((rec.T - 1) // chunk) * chunk, -1, -chunk):
        sl = slice(start, min(start + chunk, rec.T))
        d_chunk, a_chunk = rec.step(sl)
        e_chunk = rec.entry(sl) if rec.entry is not None else None
        if R is None:
            eye = torch.eye(rec.M, dtype=a_chunk.dtype, device=a_chunk.device)
            R = (eye if rec.rows is None else eye[rec.rows]).expand(rec.B, -1, -1)
            rescale = Rescale(a_chunk.dtype, rec.B, a_chunk.device)
        for j in range(sl.stop - sl.start - 1, -1, -1):
            if rec.cols is not None:
                J = R[..., rec.cols]
            elif e_chunk is not None:
                P = e_chunk.shape[-2]
                J = R[..., :P] @ e_chunk[:, j] + R[..., P:]
            else:
                J = R
            yield sl.start + j, J, rescale.E, (d_chunk[:, j] if d_chunk is not None else None)
            R = R @ a_chunk[:, j]  # now ∂s_{T−1}/∂(running state)_{n−1}
            rescale((R,))


@public("cell_jacobians", module=True, ints={"layer": 0, "direction": 0, "chunk_size": 1})
def cell_jacobians(module: nn.Module | Trace, inputs=None, hx=None, *, layer: int = 0,
                   direction: int = 0, state: State | None = None, keep: Keep = "norms",
                   method: Method = "auto", chunk_size: int | None = None) -> CellJacobians:
    """Exact Jacobians of the final state with respect to every earlier state.

    J[b, n] = ∂s_{end}/∂s_n for n = 0..T−1 (J[:, end] = I), accumulated in one reverse sweep
    J_n = J_{n+1} · A_{n+1} over closed-form one-step Jacobians A. `end` is T−1, or for a
    PackedSequence the last step of sample b's own recurrence (direction 0: its length − 1).

    Args:
        module: the recurrent module, or a `Trace` from `replay` (then inputs and hx are not
            given): one replay serves every analysis of it.
        inputs: a tensor in the module's layout, or a PackedSequence: steps a sequence does not
            have are not measured (nan, `.valid` False) and never count as decay.
        state: as in `step_jacobians`. For the LSTM cell state, J holds the direct path (the
            product of forget gates) AND every indirect path through h and the next gates.
        keep: "norms" (default) keeps only per-step norms, shares and the direct path,
            holding O(B·N²) memory for the running product; "full" also keeps `.total`
            (B, T, N, N). The norms are exact down to float64's range (~1e−300) whatever
            the model's dtype (the sweeps rescale by powers of two); with
            "full", `.total` is in the model's dtype, so a float32 span Jacobian below ~1e−38
            is stored subnormal or 0, and the norms then describe the stored matrices.
        method: as in `step_jacobians`.
        chunk_size: steps whose Jacobians are built or reduced at once (None: up to 64,
            fewer for large states; `spectral.steps_per_chunk`). Results agree whatever its
            value (to rounding); memory grows with it.

    Returns:
        `CellJacobians` with `.direct` (B, T, N) = ∏_{m=n+1}^{end} f_m (LSTM "c") or z_m
        (GRU), None otherwise; `.spectral_norm()` (B, T); `.highway_share()` (B, T).
        A sample whose Jacobians hold a NaN/Inf is flagged in `.nonfinite` (B,), all its
        values are nan, and a RuntimeWarning gives the count; the other samples are computed
        exactly as without it.

    Example:
        >>> lstm = nn.LSTM(3, 4, batch_first=True)
        >>> cj = cell_jacobians(lstm, torch.randn(2, 6, 3))  # ∂c_5/∂c_n, n = 0..5
        >>> cj.spectral_norm().shape, cj.total is None
        (torch.Size([2, 6]), True)
        >>> full = cell_jacobians(lstm, torch.randn(2, 6, 3), keep="full")
        >>> assert torch.allclose(full.total[:, -1], torch.eye(4, dtype=full.total.dtype))
    """
    if keep not in ("full", "norms"):
        raise ValueError(f"keep must be 'full' or 'norms'; got {keep!r}")
    if is_decay_recurrence(module):  # modern/protocol.py
        dspec = _decay_spec(module, layer=layer, direction=direction, state=state,
                            method=method)
        if dspec.linear:  # the decay product is the whole Jacobian
            return decay.cell_jacobians(dspec, inputs, hx, keep=keep)
        rec = _recurrence(module, inputs, hx, layer=layer, direction=direction, state=state,
                          method=method)
        return decay.as_decay_cell_jacobians(_finish_cell_jacobians(
            rec, *_dense_span_jacobians(rec, keep, _chunk(chunk_size, rec)), layer=layer, direction=direction), False)
    rec = _recurrence(module, inputs, hx, layer=layer, direction=direction, state=state,
                      method=method)
    chunk = _chunk(chunk_size, rec)
    if rec.closed is not None:  # the closed-form adjoint sweep (unpacked traces)
        lt, p, nonlinearity = rec.closed
        if keep == "full":  # the Jacobians now, their norms when first read
            sw = span_jacobians(lt, p, kind=rec.kind, state=rec.state,
                                nonlinearity=nonlinearity, keep="jacobians", chunk_size=chunk)
            return _deferred_cell_jacobians(rec, sw.total, sw.direct, chunk, layer=layer,
                                            direction=direction)
        sw = span_jacobians(lt, p, kind=rec.kind, state=rec.state, nonlinearity=nonlinearity,
                            keep=keep, chunk_size=chunk)
        total, spectral, frob, direct, share = (sw.total, sw.spectral, sw.frobenius, sw.direct,
                                                sw.share)
    else:
        total, spectral, frob, direct, share = _dense_span_jacobians(rec, keep, chunk)
    return _finish_cell_jacobians(rec, total, spectral, frob, direct, share, layer=layer,
                                  direction=direction)


def _dense_span_jacobians(rec: _Recurrence, keep: str, chunk: int):
    """The span Jacobians by multiplying dense one-step Jacobians (packed traces, custom and
    autograd cells): (total (B, T, N, N) or None, spectral, frobenius, direct, share)."""
    B, T = rec.B, rec.T
    totals = [None] * T if keep == "full" else None
    spectral = torch.empty(B, T, dtype=torch.float64)
    frob = torch.empty(B, T, dtype=torch.float64)
    direct = share = running = None
    batch: list = []  # (n, J, ∏ d) of up to `chunk` steps, reduced together

    def reduce():
        idx = [n for n, _, _ in batch]
        # (B, S, N, N) float64 = 2^E · J̃: exact down to float64's range
        Js = torch.stack([J for _, J, _ in batch], 1)
        spectral[:, idx] = spectral_norms(Js).cpu()
        frob[:, idx] = torch.linalg.matrix_norm(Js).cpu()
        if batch[0][2] is not None:
            run = torch.stack([r for _, _, r in batch], 1)  # (B, S, N)
            direct[:, idx] = run.cpu()
            share[:, idx] = highway_energy_share(Js, run).cpu()
        batch.clear()

    for n, J, E, d in _sweep(rec, chunk):
        J64 = J.to(torch.float64)
        if bool(E.any()):
            J64 = torch.ldexp(J64, E.view(-1, 1, 1).to(torch.float64))
        if totals is not None:  # in the trace's dtype: what it can hold (0 where it cannot)
            totals[n] = J64.to(J.dtype).detach().cpu()
        if d is not None and running is None:
            running = torch.ones_like(d, dtype=torch.float64)  # ∏_{m>n} d_m, from m = T−1
            direct = torch.empty(B, T, d.shape[-1], dtype=torch.float64)
            share = torch.empty(B, T, dtype=torch.float64)
        batch.append((n, J64, running))
        if d is not None:
            running = running * d.to(torch.float64)
        if len(batch) == chunk:
            reduce()
    if batch:
        reduce()
    total = torch.stack(totals, 1) if totals is not None else None
    return total, spectral, frob, direct, share


def _finish_cell_jacobians(rec: _Recurrence, total, spectral, frob, direct, share, *, layer,
                           direction) -> CellJacobians:
    """Steps a sequence does not have and every step of a non-finite sample become nan."""
    T = rec.T
    valid = rec.valid_cpu
    ok = torch.isfinite(spectral) & torch.isfinite(frob)
    if direct is not None:
        ok &= torch.isfinite(direct).all(-1)
    bad = _per_sample_bad(ok, valid)
    off = _unmeasured(valid, bad, T)
    for t in (spectral, frob, share):
        if t is not None:
            t.masked_fill_(off, math.nan)
    if direct is not None:
        direct.masked_fill_(off.unsqueeze(-1), math.nan)
    if total is not None and bool(off.any()):
        total = total.masked_fill(off[..., None, None], math.nan)
    _warn_nonfinite("cell_jacobians", bad)
    return CellJacobians(total=total, direct=direct, spectral=spectral, frobenius=frob,
                         share=share, state=rec.state, kind=rec.kind, layer=layer,
                         direction=direction, positions=rec.positions, valid=valid,
                         nonfinite=bad)


def _deferred_cell_jacobians(rec: _Recurrence, total, direct, chunk: int, *, layer,
                             direction) -> CellJacobians:
    """`CellJacobians` of keep="full" from the sweep's Jacobians, its spectral/Frobenius norms
    and share computed on first read (`results.Deferred`) by the same `span_norms` that
    keep="norms" streams through, so both give the same bits. Non-finite samples are found from
    the Jacobians themselves (a norm is non-finite exactly where its matrix holds a NaN/Inf);
    when there are any, the norms are computed now, from the Jacobians before masking, as
    `_finish_cell_jacobians` does."""
    ok = torch.isfinite(total.abs().amax(dim=(-2, -1)))  # (B, T); amax keeps nan
    if direct is not None:
        ok &= torch.isfinite(direct).all(-1)
    bad = _per_sample_bad(ok, rec.valid_cpu)
    if bool(_unmeasured(rec.valid_cpu, bad, rec.T).any()):
        spectral, frob, share = span_norms(total, direct, chunk)
        return _finish_cell_jacobians(rec, total, spectral, frob, direct, share, layer=layer,
                                      direction=direction)
    norms = Deferred(functools.partial(_span_norm_fields, total, direct, chunk))
    return CellJacobians(total=total, direct=direct, spectral=norms, frobenius=norms,
                         share=norms if direct is not None else None, state=rec.state,
                         kind=rec.kind, layer=layer, direction=direction,
                         positions=rec.positions, valid=rec.valid_cpu, nonfinite=bad)


def _span_norm_fields(total, direct, chunk: int) -> dict:
    """The deferred fields of `_deferred_cell_jacobians` (a module-level function: picklable)."""
    spectral, frob, share = span_norms(total, direct, chunk)
    return {"spectral": spectral, "frobenius": frob, "share": share}


@public("lyapunov_spectrum", module=True,
        ints={"layer": 0, "direction": 0, "k": 1, "warmup": 0, "chunk_size": 1})
def lyapunov_spectrum(module: nn.Module | Trace, inputs=None, hx=None, *, layer: int = 0,
                      direction: int = 0, k: int | None = None, warmup: int = 0,
                      method: Method = "auto", chunk_size: int | None = None
                      ) -> LyapunovSpectrum:
    """The k largest Lyapunov exponents of the state recurrence along the input-driven
    trajectory, by the QR method on the one-step Jacobians.

    Exponents are in natural log per step (divide by ln 2 for bits per step, as some papers
    report). The state is the full recurrent state: (h, c) for an LSTM (N = H_out + H), h for
    RNN/GRU, the flattened state for a custom cell. The first `warmup` steps of each sequence
    evolve the orthonormal frame without being counted. `module` may be a `Trace` from
    `replay` (then inputs and hx are not given).

    For a PackedSequence each sample's exponents average over its own steps only (those past
    its end are skipped); a sample with no more than `warmup` steps gets nan. A sample whose
    Jacobians hold a NaN/Inf gets a row of nan (a RuntimeWarning gives the count); the others
    are computed exactly as without it. `chunk_size` steps of one-step Jacobians are built at
    once (None: up to 64, fewer for large states; `spectral.steps_per_chunk`); the exponents
    agree whatever its value (to rounding). An LSTM on an unpacked trace never forms its
    (P + H)² one-step Jacobians: each step applies them to the QR frame from the gates
    (`cells.lstm.step_jvp`), in float64.

    A direction that some step maps exactly to zero (a relu unit at 0, a gate at exactly 0)
    has exponent −∞ in exact arithmetic; in floating point that step's QR diagonal is rounding
    noise (|R_ii| ≈ 1e-16·‖A‖), so such an exponent lands near log(1e-16)·(share of such
    steps) and its precise value is not determined. Read an exponent far below the others as
    "annihilated", not as a measured rate.

    Returns:
        `LyapunovSpectrum` whose `.exponents` is (B, k) float64, sorted descending per sample
        ((k,) for unbatched inputs).
    """
    if is_decay_recurrence(module) and _decay_spec(module, layer=layer, direction=direction,
                                                   state=None, method=method).linear:
        return decay.lyapunov_spectrum(describe_decay(module), inputs, hx, k=k, warmup=warmup)
    spec = module.spec if isinstance(module, Trace) else (
        None if _is_custom_cell(module) else describe(module))
    spec_kind_state = None if spec is None else ("full" if spec.kind == "lstm" else "h")
    rec = _recurrence(module, inputs, hx, layer=layer, direction=direction,
                      state=spec_kind_state, method=method)
    B, T, N = rec.B, rec.T, rec.N
    k = N if k is None else k
    if not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N={N}] (the state size); got {k!r}")
    if not isinstance(warmup, int) or not 0 <= warmup < T:
        raise ValueError(f"warmup must be an int in [0, T={T}); got {warmup!r}")
    valid = rec.valid_cpu if rec.valid_cpu is not None else torch.ones(B, T, dtype=torch.bool)
    counted = valid & (valid.cumsum(1) > warmup)  # (B, T): past each sequence's own warmup
    Q = None
    logs = torch.zeros(B, k, dtype=torch.float64)
    bad = torch.zeros(B, dtype=torch.bool)
    chunk = _chunk(chunk_size, rec)
    jvp = _LSTMFullStateJVP(*rec.closed[:2]) if (
        rec.kind == "lstm" and rec.closed is not None and rec.rows is None) else None
    for start in range(0, T, chunk):
        sl = slice(start, min(start + chunk, T))
        if jvp is None:
            _, a_chunk = rec.step(sl)
            a_chunk = a_chunk.to(torch.float64)
            steps = a_chunk.unbind(1)  # (B, M, M) each
        else:  # F_n·Q from the gates, no (B, S, M, M) Jacobians built
            steps = jvp.steps(sl)
        if Q is None:
            Q = torch.eye(N, k, dtype=torch.float64, device=jvp.device if jvp is not None
                          else a_chunk.device).expand(B, N, k)
        for j, a in enumerate(steps):
            aq = a @ Q if jvp is None else jvp(a, Q)  # (B, N, k)
            # A NaN/Inf in A makes A·Q non-finite (Q is orthonormal: NaN·0 is NaN), and so does
            # an overflow: checking the small product avoids a pass over every A.
            v = valid[:, start + j]
            bad |= ~torch.isfinite(aq).flatten(1).all(1).cpu() & v
            if bool(bad.any()):  # a non-finite sample never reaches the QR (its row is nan)
                aq = torch.where(bad.to(aq.device)[:, None, None], Q, aq)
            if k == 1:  # QR of one column is its normalisation (compare asks for k = 1)
                r = torch.linalg.vector_norm(aq, dim=-2, keepdim=True)  # (B, 1, 1)
                q = torch.where(r > 0, aq / r, Q)  # a zero image: log 0 = −inf, frame kept
                step_log = r[..., 0].log().cpu()  # (B, 1)
            else:
                q, R = torch.linalg.qr(aq)
                step_log = torch.diagonal(R, dim1=-2, dim2=-1).abs().log().cpu()
            Q = torch.where(v.to(q.device)[:, None, None], q, Q)  # carried step: frame kept
            logs += torch.where(counted[:, start + j, None], step_log, torch.zeros(()))
    steps = counted.sum(1, keepdim=True).to(torch.float64)  # (B, 1)
    exps = torch.where(steps > 0, logs / steps.clamp_min(1), torch.full_like(logs, math.nan))
    exps = exps.masked_fill(bad.unsqueeze(1), math.nan)
    exps = exps.sort(dim=-1, descending=True).values
    _warn_nonfinite("lyapunov_spectrum", bad)
    return LyapunovSpectrum(exps[0] if rec.unbatched else exps, layer=layer,
                            direction=direction, warmup=warmup, state_size=N)


class _LSTMFullStateJVP:
    """An unpacked LSTM trace's one-step Jacobians F_n of the full (h, c) state, applied to
    the QR frame without being formed (`cells.lstm.step_jvp`), in float64: per step one
    (4H, P) product per column instead of the (P + H)² entries the dense path builds and
    converts (lyapunov_spectrum of the default LSTM at T = 1000: most of its time)."""

    def __init__(self, lt, p):
        w = cells.lstm.vjp_weights(p)
        self.w = type(w)(*(None if t is None else t.to(torch.float64) for t in w))
        self.saved = cells.lstm.vjp_saved_from_trace(p, lt)  # (B, T, …) processing order
        self.device = lt.h.device

    def steps(self, sl: slice) -> list:
        """The `VJPSaved` of processing steps sl, one per step, float64."""
        fields = [f[:, sl].to(torch.float64).unbind(1) for f in self.saved]
        return [type(self.saved)(*per_step) for per_step in zip(*fields)]

    def __call__(self, saved, q: torch.Tensor) -> torch.Tensor:
        return cells.lstm.step_jvp(self.w, saved, q)


@public("state_gradients", grad=True, module=True)
def state_gradients(module: nn.Module | Trace, inputs=None, hx=None, *, loss: Loss = "last",
                    keep: Keep = "norms") -> StateGradients:
    """Exact total gradients ∂L/∂h_t and (LSTM) ∂L/∂c_t for every layer, direction and step.

    "Total" means everything that reaches the state: the gradient injected at its own output
    step plus all that flows back through the recurrence and the layers above. Taken in one
    backward of the replay with respect to the per-step state tensors themselves; the module's
    parameters and their .grad are not touched.

    Args:
        module: the recurrent module, or a `Trace` from `replay` (then inputs and hx are not
            given), made with gradients enabled (its graph is kept, so the trace serves again)
            — or, for a fused module on a batched tensor, without a graph: then the gradients
            come from a closed-form backward sweep (`state_sweep`, each cell's one-step VJP).
        loss: as in `gradient_profile`: "last", "all" or a callable(outputs (B, T, F)) -> (B,).
            Outputs are the module's output sequence, batch-major.
        keep: "norms" (default) keeps (B, T) norms; "full" also keeps the gradient tensors.
    """
    if keep not in ("full", "norms"):
        raise ValueError(f"keep must be 'full' or 'norms'; got {keep!r}")
    sg = _state_gradients(module, inputs, hx, loss=loss, keep=keep)
    bad = sum(g.nonfinite for dirs in sg.layers for g in dirs)
    if bad:
        warnings.warn(f"state_gradients: {bad} non-finite gradient value(s) (NaN/Inf in the "
                      "inputs, the state or the weights); the norms they reach are NaN/Inf "
                      "(`.nonfinite` per layer)", RuntimeWarning, stacklevel=3)
    return sg


def _state_gradients(module, inputs, hx, *, loss, keep) -> StateGradients:
    if isinstance(module, Trace):
        if not _has_graph(module) and can_sweep(module):
            return swept_state_gradients_from_loss(module, loss=loss, keep=keep,
                                                   loss_name=_loss_name(loss))
        return _trace_state_gradients_from_loss(module, loss=loss, keep=keep,
                                                retain_graph=True)
    if is_decay_recurrence(module):  # modern/protocol.py: one reverse scan of the decays
        return decay.state_gradients(describe_decay(module), inputs, hx, loss=loss, keep=keep,
                                     loss_name=_loss_name(loss))
    if _is_custom_cell(module):
        return _custom_state_gradients(module, inputs, hx, loss=loss, keep=keep)
    spec = describe(module)
    packed = isinstance(inputs, PackedSequence)
    if not packed and stream.streamable(spec):
        x, _ = check_inputs(spec, inputs)
        if stream.large(spec, x.shape[0], x.shape[1]):
            return streamed_state_gradients(module, inputs, hx, loss=loss, keep=keep)
    if packed:
        inputs = PackedSequence(inputs.data.detach().requires_grad_(True), inputs.batch_sizes,
                                inputs.sorted_indices, inputs.unsorted_indices)
    else:
        check_inputs(spec, inputs)
        inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        # Inputs that require grad guarantee a graph even if no parameter requires grad.
        tr = replay(module, inputs, hx)
        return _trace_state_gradients_from_loss(tr, loss=loss, keep=keep, retain_graph=False)


def streamed_state_gradients(module: nn.Module, inputs, hx=None, *, loss="last",
                             keep: str = "norms", chunk: int | None = None,
                             input_grad: bool = False):
    """`state_gradients` of an unpacked input in chunks of time (`stream`): the same numbers
    to float rounding with memory O(B·T·N) instead of the whole graph. `state_gradients` takes
    this path by itself when the batch is large (`stream.large`); `chunk` steps per chunk
    (default `stream.chunk_steps`). `input_grad`: returns (StateGradients, ∂L/∂x batch-major
    (B, T, I)) from the same backward."""
    spec = describe(module)
    if not stream.streamable(spec):
        raise ValueError(f"this {type(module).__name__} draws inter-layer dropout masks in "
                         "training mode: its chunks cannot be re-run; call module.eval() first")
    x, unbatched = check_inputs(spec, inputs)
    check_replayable(spec, device=x.device)
    check_subclass(module)
    B, T = x.shape[:2]
    h0s, c0s = check_initial_state(spec, hx, B, unbatched, x)
    chunk = chunk or stream.chunk_steps(spec, B)
    runs, _ = stream.forward(spec, x, h0s, c0s, chunk=chunk)
    seq = stream.output_sequence(runs).detach().requires_grad_(True)  # (B, T, F)
    with torch.enable_grad():
        losses = per_sample_loss(seq, loss, B)
        (g_seq,) = torch.autograd.grad(losses.sum(), [seq], allow_unused=True)
    if g_seq is None:
        g_seq = torch.zeros_like(seq)
    del seq
    grads, dx = stream.backward(spec, x, runs, g_seq, keep=keep, input_grad=input_grad)
    layers = []
    for row in grads:
        out = []
        for g in row:
            # as `gradient_layer`: non-finite values are counted where some norm is non-finite
            bad = (g.bad_h if not torch.isfinite(g.h).all() else 0) + (
                g.bad_c if g.c is not None and not torch.isfinite(g.c).all() else 0)
            out.append(StateGradientLayer(h=g.h, c=g.c, h_full=g.h_full, c_full=g.c_full,
                                          nonfinite=bad))
        layers.append(tuple(out))
    sg = StateGradients(tuple(layers), _loss_name(loss))
    return (sg, dx) if input_grad else sg


def _trace_state_gradients_from_loss(tr, *, loss, keep: str, retain_graph: bool,
                                     also: tuple = ()):
    """state_gradients on a replay trace: the loss on its top layer's output sequence.
    With `also` (tensors the trace was computed from), returns (StateGradients, their
    gradients from the same backward)."""
    top = tr.layers[-1]
    seq = top_sequence(tr)  # (B, T, F)
    if not seq.requires_grad:
        raise ValueError("state_gradients needs a Trace with a graph: call replay() with "
                         "gradients enabled (not under torch.no_grad()) on inputs or a module "
                         "that require grad, or pass (module, inputs, hx)")
    packed = tr.lengths is not None
    if packed and loss == "last":  # each sequence's own last valid step
        valid = top[0].valid
        seq = seq * valid.unsqueeze(-1).to(seq)  # the module's output is 0 past the end
        idx = (valid.sum(1) - 1).clamp_min(0)
        losses = seq[torch.arange(seq.shape[0]), idx].sum(-1)
    else:
        if packed:
            seq = seq * top[0].valid.unsqueeze(-1).to(seq)
        losses = per_sample_loss(seq, loss, seq.shape[0])
    out = _state_gradients_and(tr, [losses.sum()], None, keep=keep, loss=_loss_name(loss),
                               retain_graph=retain_graph, also=also)
    return out if also else out[0]


def trace_state_gradients(trace, outputs: list, grad_outputs: list | None = None, *,
                          keep: str = "norms", loss: str = "custom",
                          retain_graph: bool = False) -> StateGradients:
    """Total state gradients of a replay `trace` from one backward of `outputs` (weighted by
    `grad_outputs`, as in torch.autograd.grad) taken w.r.t. the per-step state tensors.

    Shared by `state_gradients` (outputs = [Σ_s L_s]) and the GradientMonitor (outputs = the
    replayed output and final states, grad_outputs = the gradients the real loss sent them).
    A state the backward never reaches gets gradient zero.
    """
    return _state_gradients_and(trace, outputs, grad_outputs, keep=keep, loss=loss,
                                retain_graph=retain_graph)[0]


def _state_gradients_and(trace, outputs: list, grad_outputs, *, keep: str, loss: str,
                         retain_graph: bool, also: tuple = ()):
    """(`trace_state_gradients`, [gradient of each tensor in `also`]) from one backward."""
    states = [t for dirs in trace.layers for lt in dirs
              for t in lt.steps_h + (lt.steps_c or ())]
    targets = states + list(also)
    grads = (torch.autograd.grad(outputs, targets, grad_outputs, allow_unused=True,
                                 retain_graph=retain_graph)
             if outputs else [None] * len(targets))
    grads = _zeros_if_none(grads, targets)
    it = iter(grads[:len(states)])
    layers = []
    for dirs in trace.layers:
        row = []
        for lt in dirs:
            gh = [next(it) for _ in lt.steps_h]
            gc = [next(it) for _ in lt.steps_c] if lt.steps_c is not None else None
            row.append(gradient_layer(gh, gc, lt.reverse, keep, lt.valid))
        layers.append(tuple(row))
    return StateGradients(tuple(layers), loss), grads[len(states):]


def _has_graph(tr) -> bool:
    """Whether the trace's top layer output is part of an autograd graph."""
    return tr.layers[-1][0].h.requires_grad


def _loss_name(loss) -> str:
    return "custom" if callable(loss) else str(loss)


def _zeros_if_none(grads, targets):
    """A state the loss never reaches (allow_unused) has gradient zero, not None."""
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets)]


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
    return StateGradients(((gradient_layer(gh, gc, False, keep),),), _loss_name(loss))


def _cpu(t):
    return None if t is None else t.detach().to("cpu")
