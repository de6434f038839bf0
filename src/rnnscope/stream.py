"""Streamed (time-chunked) forms of the analyses that take the whole batch: memory O(B·T·N).

A replay of B sequences of T steps with its autograd graph holds every gate intermediate of
every step (an LSTM: about 15 (B, H) tensors a step); at B = 50, T = 10 000, H = 128 that is
several GB. The analyses here run the same equations in chunks of time instead:

1. a forward pass without a graph, chunk by chunk (`cells.<kind>.run` on a slice of steps from
   the state the previous chunk ended in), keeping only each layer's output sequence and the
   state entering each chunk (a checkpoint);
2. a backward pass from the last chunk to the first: each chunk is re-run *with* a graph from
   its checkpoint and differentiated with one `torch.autograd.grad`, seeded with the output
   gradients of the chunk and with the gradient its successor sent back into the checkpoint.

This is exact (checkpointed backpropagation through time): every chunk is re-run with the same
operations from the same state, so the gradients equal those of one graph over all steps up to
float rounding (the input projection is one GEMM per chunk instead of one per sequence). Memory
is the outputs and checkpoints (O(B·T·N)) plus one chunk's graph; time is one extra forward.

Packed sequences and training-mode inter-layer dropout are not streamed (callers keep their
whole-graph path for them, `streamable` says so).

Shape legend: B batch, T steps, C steps per chunk, I_l layer input, H hidden, H_out output
(projection) size, L layers, D directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cells
from .checks import count_nonfinite
from .recurrent import BLOCKS, RecurrentSpec

# Above this many gate pre-activation values (B·T·G·H) per layer, or this many steps, the
# whole-batch analyses stream. Below both a single graph is small (≤ 256 MB of float32 per
# gate-sized array, and a few thousand steps of autograd nodes, ~1 KB each a step whatever
# B and H) and the results are bit-identical to what they were before streaming existed.
STREAM_ELEMENTS = 1 << 26
STREAM_STEPS = 4096
# Gate values of one chunk's graph (B·C·G·H): about 32 MB of float32 per gate-sized array.
CHUNK_ELEMENTS = 1 << 23


# Sample·steps a group of the causal Transformer's profile holds at once (profile.py; about
# 0.5 GB of its activations at d_model = 128: 0.97 GB was measured at 50 × 2400).
GROUP_SAMPLE_STEPS = 1 << 16
# At most this many steps a chunk: autograd keeps ~1 KB of nodes a step whatever B and H.
CHUNK_STEPS = 512


def chunk_steps(spec: RecurrentSpec, B: int) -> int:
    """Steps per chunk: one chunk's graph holds about CHUNK_ELEMENTS gate values, and at most
    CHUNK_STEPS steps."""
    width = BLOCKS[spec.kind] * spec.hidden_size
    return max(16, min(CHUNK_STEPS, CHUNK_ELEMENTS // max(1, B * width)))


def large(spec: RecurrentSpec, B: int, T: int) -> bool:
    """True when one graph over all B·T steps would be large enough to stream instead."""
    return T > STREAM_STEPS or B * T * BLOCKS[spec.kind] * spec.hidden_size > STREAM_ELEMENTS


def streamable(spec: RecurrentSpec) -> bool:
    """The module's recurrence can be re-run chunk by chunk from a checkpoint: not with
    training-mode inter-layer dropout (random masks drawn per call)."""
    return not (not spec.is_cell and spec.module.training and spec.dropout > 0
                and spec.num_layers > 1)


def _run(spec: RecurrentSpec, p, x, h0, c0, reverse: bool):
    if spec.kind == "lstm":
        return cells.lstm.run(p, x, h0, c0, reverse=reverse)
    eq = cells.rnn if spec.kind == "rnn" else cells.gru
    return eq.run(p, x, h0, reverse=reverse, nonlinearity=spec.nonlinearity)


def _chunks(T: int, C: int, reverse: bool) -> list[slice]:
    """Position slices of the chunks in processing order (direction 1 runs from the end)."""
    out = [slice(a, min(T, a + C)) for a in range(0, T, C)]
    if reverse:
        out = [slice(T - s.stop, T - s.start) for s in out]
    return out


@dataclass
class _LayerRun:
    """One layer and direction run without a graph: out (B, T, H_out) position order, and per
    chunk (processing order) its position slice and the (h, c) state entering it."""

    out: torch.Tensor
    chunks: list
    starts: list


def forward(spec: RecurrentSpec, x: torch.Tensor, h0s: list, c0s: list, *, chunk: int,
            gate: str | None = None) -> tuple[list, dict]:
    """The chunked forward without a graph.

    x (B, T, I) batch-major; h0s / c0s as `checks.check_initial_state` returns them.
    Returns (runs[l][d] `_LayerRun`, gates (l, d) -> (B, T, H) values of `gate`, if asked).
    """
    B, T = x.shape[:2]
    D = spec.num_directions
    runs, gates = [], {}
    layer_in = x
    with torch.no_grad():
        for layer in range(spec.num_layers):
            row = []
            for d in range(D):
                p = spec.params(layer, d)
                h, c = h0s[layer * D + d], c0s[layer * D + d]
                out = x.new_empty(B, T, spec.hidden_out)
                g = x.new_empty(B, T, spec.hidden_size) if gate is not None else None
                sls, starts = _chunks(T, chunk, d == 1), []
                for sl in sls:
                    starts.append((h, c))
                    lt = _run(spec, p, layer_in[:, sl], h, c, d == 1)
                    out[:, sl] = lt.h
                    if g is not None:
                        g[:, sl] = lt.gates[gate]
                    h = lt.steps_h[-1]
                    c = lt.steps_c[-1] if lt.steps_c is not None else None
                row.append(_LayerRun(out, sls, starts))
                if g is not None:
                    gates[(layer, d)] = g
            runs.append(row)
            layer_in = row[0].out if D == 1 else torch.cat([r.out for r in row], dim=-1)
    return runs, gates


def output_sequence(runs: list) -> torch.Tensor:
    """(B, T, D·H_out): the top layer's outputs, directions concatenated (the module's output
    sequence, batch-major)."""
    top = runs[-1]
    return top[0].out if len(top) == 1 else torch.cat([r.out for r in top], dim=-1)


@dataclass
class LayerGradients:
    """Per layer and direction, position order: (B, T) float64 norms of the total gradients
    ∂L/∂h_t and (LSTM) ∂L/∂c_t, their full values with keep="full", and non-finite counts."""

    h: torch.Tensor
    c: torch.Tensor | None
    h_full: torch.Tensor | None
    c_full: torch.Tensor | None
    bad_h: int
    bad_c: int


def backward(spec: RecurrentSpec, x: torch.Tensor, runs: list, g_out: torch.Tensor, *,
             keep: str = "norms", input_grad: bool = False):
    """The chunked backward: total state gradients of every layer and direction, and
    (input_grad) ∂L/∂x (B, T, I).

    g_out (B, T, D·H_out): ∂L/∂(the top layer's output sequence). A layer's chunk is re-run
    with a graph from its checkpoint; one autograd.grad gives the total gradient of each step's
    state tensors (what the output sends there plus what flows back from later steps, carried
    between chunks through the checkpoint), of the checkpoint itself and of the chunk's input.
    Returns (layers[l][d] `LayerGradients`, ∂L/∂x or None).
    """
    B, T = x.shape[:2]
    D, L = spec.num_directions, spec.num_layers
    Ho = spec.hidden_out
    lstm = spec.has_cell_state
    result = [[None] * D for _ in range(L)]
    g_top = g_out
    for layer in reversed(range(L)):
        layer_in = x if layer == 0 else output_sequence(runs[:layer])
        want_dx = layer > 0 or input_grad
        g_in = x.new_zeros(B, T, layer_in.shape[-1]) if want_dx else None
        for d in range(D):
            run = runs[layer][d]
            p = spec.params(layer, d)
            g_here = g_top[..., d * Ho:(d + 1) * Ho]
            norms_h = torch.empty(B, T, dtype=torch.float64)
            norms_c = torch.empty(B, T, dtype=torch.float64) if lstm else None
            full_h = torch.empty(B, T, Ho, dtype=x.dtype) if keep == "full" else None
            full_c = torch.empty(B, T, spec.hidden_size, dtype=x.dtype) if keep == "full" and lstm else None
            bad_h = bad_c = 0
            carry_h = carry_c = None
            for sl, (h0, c0) in reversed(list(zip(run.chunks, run.starts))):
                h0 = h0.detach().requires_grad_(True)
                c0 = c0.detach().requires_grad_(True) if c0 is not None else None
                xk = layer_in[:, sl].detach().requires_grad_(want_dx)
                with torch.enable_grad():
                    lt = _run(spec, p, xk, h0, c0, d == 1)
                outs, seeds = [lt.h], [g_here[:, sl]]
                if carry_h is not None:
                    outs.append(lt.steps_h[-1])
                    seeds.append(carry_h)
                if carry_c is not None:
                    outs.append(lt.steps_c[-1])
                    seeds.append(carry_c)
                steps_c = list(lt.steps_c) if lstm else []
                starts = [h0] + ([c0] if lstm else [])
                targets = list(lt.steps_h) + steps_c + starts + ([xk] if want_dx else [])
                grads = torch.autograd.grad(outs, targets, seeds, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets)]
                n = len(lt.steps_h)
                gh = _positions(grads[:n], d == 1)  # (B, S, H_out) position order
                norms_h[:, sl] = gh.to("cpu", torch.float64).norm(dim=-1)
                bad_h += count_nonfinite(gh)
                if full_h is not None:
                    full_h[:, sl] = gh.cpu()
                if lstm:
                    gc = _positions(grads[n:2 * n], d == 1)
                    norms_c[:, sl] = gc.to("cpu", torch.float64).norm(dim=-1)
                    bad_c += count_nonfinite(gc)
                    if full_c is not None:
                        full_c[:, sl] = gc.cpu()
                rest = grads[len(lt.steps_h) + len(steps_c):]
                carry_h = rest[0]
                carry_c = rest[1] if lstm else None
                if want_dx:
                    g_in[:, sl] += rest[-1]
            result[layer][d] = LayerGradients(norms_h, norms_c, full_h, full_c, bad_h, bad_c)
        g_top = g_in
    return result, (g_top if input_grad else None)


def _positions(steps: list, reverse: bool) -> torch.Tensor:
    return torch.stack(steps[::-1] if reverse else steps, dim=1)
