"""Input-gradient analysis: gradient_profile, compare.

The per-sample norm ‖∂L_s/∂x_{s,t}‖ for every sample s and timestep t comes from ONE batched
forward and ONE backward of Σ_s L_s with respect to the measured tensor only. That is exact
because the samples of a batch do not interact: ∂(Σ_r L_r)/∂x_s = ∂L_s/∂x_s. Anything that
mixes samples (batch norm in training mode, a loss that couples samples) breaks this; batch
norm in training mode is refused, a custom loss must return one independent loss per sample.

Where x is measured (the model's input or a submodule's, `site.forward_at_site`) and which of
its dimensions is time come from what the model's recurrent submodules really receive.
Only ∂L/∂x is taken (torch.autograd.grad), so the model's parameters, their .grad, train/eval
mode and requires_grad flags are left exactly as they were.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import stream
from .budget import check_memory, model_bytes
from .checks import check_model_call, check_number, count_nonfinite, current_entry, public
from .losses import LOSS_CHOICES, check_loss_option, sample_losses
from .options import Loss
from .results import Comparison, GradientProfile
from .site import ModelCall, SiteForward, forward_at_site, model_call, unwrap_model


def model_input_size(model: nn.Module) -> int | None:
    """The feature size a model's forward expects, when the model says: its own `input_size`,
    else that of its first recurrent submodule (verified later against what that submodule
    really receives, see `_check_drawn_inputs`). None when nothing says."""
    model = unwrap_model(model)
    size = getattr(model, "input_size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    for m in model.modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            return m.input_size
    return None


def is_time_major(model: nn.Module) -> bool:
    """True when the model's forward takes (T, B, I): an nn.RNNBase with batch_first=False."""
    model = unwrap_model(model)
    return isinstance(model, nn.RNNBase) and not model.batch_first


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return p.dtype, p.device


def random_inputs(model: nn.Module, *, seq_len: int, samples: int, seed: int,
                  input_size: int | None = None) -> torch.Tensor:
    """Standard normal (samples, seq_len, I) batch-major inputs from a generator seeded with
    `seed`, drawn on the CPU (so the numbers do not depend on the device) and moved to the
    model's device and dtype."""
    fn = current_entry("random_inputs")
    for name, v in (("seq_len", seq_len), ("samples", samples)):
        check_number(fn, name, v, low=1, integer=True)
    check_number(fn, "seed", seed, integer=True)
    size = model_input_size(model) if input_size is None else input_size
    if size is None:
        raise ValueError(f"cannot tell the input size of a {type(model).__name__}: it has no "
                         "`input_size` attribute and no recurrent submodule; pass inputs (or "
                         "input_size=)")
    check_number(fn, "input_size", size, low=1, integer=True)
    check_memory(fn, model_bytes(model, samples=samples, seq_len=seq_len, input_size=size),
                 f"{samples} drawn sequences of {seq_len} steps × {size} features for the "
                 f"{type(model).__name__}", "use fewer samples or a shorter seq_len")
    dtype, device = model_dtype_device(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, seq_len, size, generator=g, dtype=torch.float64).to(
        device=device, dtype=dtype)


def per_sample_loss(outputs: torch.Tensor, loss, batch: int) -> torch.Tensor:
    """(B,) per-sample losses from batch-major outputs (B, T, F) of a recurrent module's own
    replay (used by the state-gradient analyses, whose outputs have a known layout)."""
    if callable(loss):
        out = loss(outputs)
        if not isinstance(out, torch.Tensor) or out.dim() not in (1, 2) or out.shape[0] != batch:
            raise ValueError(f"a loss callable must return per-sample losses of shape ({batch},) "
                             f"or per-step losses ({batch}, T); got "
                             f"{tuple(getattr(out, 'shape', ())) or type(out).__name__}")
        return out if out.dim() == 1 else out.sum(1)
    if outputs.dim() != 3:
        raise ValueError(f"expected the output sequence (B, T, F); got {tuple(outputs.shape)}")
    if loss == "last":
        return outputs[:, -1].sum(-1)
    if loss == "all":
        return outputs.sum((1, 2))
    raise ValueError(f"loss must be {LOSS_CHOICES}; got {loss!r}")


def _refuse_sample_mixing(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"{name or type(m).__name__} is batch norm in training mode: it "
                             "mixes the samples of a batch, so per-sample gradients from one "
                             "batched backward would be wrong; call model.eval() first")


def cudnn_guard(model: nn.Module, x):
    """cuDNN refuses RNN backward in eval mode; use PyTorch's own kernels there instead."""
    data = x.data if isinstance(x, PackedSequence) else x
    eval_rnn = any(isinstance(m, nn.RNNBase) and not m.training for m in model.modules())
    if isinstance(data, torch.Tensor) and data.is_cuda and eval_rnn:
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


def site_gradients(call: ModelCall, *, at, time_dim, loss, drawn: bool = False):
    """One forward at the site and one backward of Σ_s L_s: (SiteForward, (B, T, F) gradient
    batch-major). Leaves the model untouched (only the site's gradient is taken)."""
    _refuse_sample_mixing(call.model)
    # grad on even under torch.no_grad(): the loss is computed from the output here
    with cudnn_guard(call.model, call.inputs), torch.enable_grad():
        fwd = forward_at_site(call, at=at, time_dim=time_dim, drawn_batch_major=drawn)
        losses, _ = sample_losses(fwd, loss)
        grads = torch.autograd.grad(losses.sum(), fwd.tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, fwd.tensors)]
    return fwd, fwd.batch_major(grads)


@public("gradient_profile", grad=True, call=True)
def gradient_profile(module: nn.Module, inputs=None, *, at=None, forward_args=(),
                     forward_kwargs=None, time_dim: int | None = None, loss: Loss = "last",
                     seq_len: int = 100, samples: int = 50, seed: int = 0,
                     input_size: int | None = None) -> GradientProfile:
    """Per-sample, per-timestep gradient norms ‖∂L_s/∂x_{s,t}‖ in one batched pass.

    Args:
        module: any nn.Module (the whole model), called as
            `module(inputs, *forward_args, **forward_kwargs)`;
            `torch.compile`, `nn.DataParallel` and DDP wrappers are measured through the module
            they wrap.
        inputs: the model's first forward argument as it takes it: features in its own layout,
            token ids, or a PackedSequence. None draws standard normal (samples, seq_len, I)
            features from a generator seeded with `seed` (laid out the way the model reads
            them).
        at: where x is measured. None: the model's input when it is floating point, otherwise
            the input of the first recurrent submodule the forward calls (an embedding model is
            measured at the embedding's output). "input", a submodule name as in
            `named_modules()`, or the submodule itself. A recurrent submodule called once per
            step (a decoder, a cell) is measured across its calls as one time axis.
        forward_args, forward_kwargs: further arguments of the forward (hidden state, lengths,
            masks), as captum's `additional_forward_args`.
        time_dim: 0 or 1, which dimension of the model's input and output is time; only needed
            where the recurrent submodules' own inputs cannot tell (the error says so).
        loss: "last" (per sample, the sum of the output features at its last step — for packed
            or padded sequences its own last valid step), "all" (all steps) or a callable on
            what the model returns -> per-sample (B,) or per-step (B, T) losses.
        input_size: features of the drawn inputs when the model does not say.

    Returns:
        A `GradientProfile` (per sample and timestep of the site, `.site` says where, `.lengths`
        which steps each packed sequence has); non-finite values are counted and warned about.

    Example:
        >>> lm = nn.Sequential(nn.Embedding(50, 8), nn.LSTM(8, 16, batch_first=True))
        >>> prof = gradient_profile(lm, torch.randint(0, 50, (4, 20)))
        >>> prof.site, tuple(prof.per_sample.shape)
        ('1', (4, 20))
    """
    loss_name = check_loss_option(loss)
    if inputs is None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        x = random_inputs(module, seq_len=seq_len, samples=samples, seed=seed,
                          input_size=input_size)
        call = model_call(module, x, forward_args, forward_kwargs)
        return profile_drawn(call, at=at, time_dim=time_dim, loss=loss, seed=seed,
                             sized_by_model=input_size is None)[0]
    call = model_call(module, inputs, forward_args, forward_kwargs)
    return _profile(call, at=at, time_dim=time_dim, loss=loss, loss_name=loss_name, seed=None)


def profile_drawn(call: ModelCall, *, at, time_dim, loss, seed,
                  sized_by_model: bool) -> tuple[GradientProfile, ModelCall]:
    """Profile on drawn batch-major (S, T, I) features, handed to the model the way it reads
    them: a model whose recurrent submodule takes dimension 0 as time gets (T, S, I).
    Returns the profile and the call that was measured."""
    x = call.inputs
    loss_name = check_loss_option(loss)
    try:
        prof = _profile(call, at=at, time_dim=time_dim, loss=loss, loss_name=loss_name,
                        seed=seed, expect=x.shape[:2])
    except _TimeMajor:
        call = call.replace(x.transpose(0, 1))
        # S == T reads the same either way round: the retry is the time-major reading
        prof = _profile(call, at=at, time_dim=time_dim, loss=loss, loss_name=loss_name,
                        seed=seed, expect=x.shape[:2], transposed=True)
    except (RuntimeError, ValueError, TypeError) as e:
        if sized_by_model and not isinstance(e, _Refused):
            raise ValueError(f"the {type(call.model).__name__} failed on drawn inputs "
                             f"{tuple(x.shape)} (I taken from its first recurrent submodule): "
                             f"{e}. If layers before the recurrence change the feature size, "
                             "pass inputs (or input_size=)") from None
        raise
    return prof, call


class _TimeMajor(Exception):
    """The model read dimension 0 of the drawn inputs as time."""


class _Refused(ValueError):
    """A measurement rnnscope refuses on purpose (not a failure of the drawn inputs)."""


def _profile(call: ModelCall, *, at, time_dim, loss, loss_name, seed,
             expect=None, transposed: bool = False) -> GradientProfile:
    if _streams(call, at=at, time_dim=time_dim, loss=loss):
        return streamed_profile(call.model, call.inputs, loss=loss, seed=seed)
    group = _sample_group(call, at=at, time_dim=time_dim, loss=loss)
    if group:
        return _grouped_profile(call, group, at=at, time_dim=time_dim, loss=loss,
                                loss_name=loss_name, seed=seed, drawn=expect is not None)
    try:
        fwd, grad = site_gradients(call, at=at, time_dim=time_dim, loss=loss,
                                   drawn=expect is not None)
    except ValueError as e:
        if expect is not None and "batch norm" in str(e):
            raise _Refused(str(e)) from None
        raise
    if expect is not None and not transposed and fwd.site == "input" and \
            fwd.axes.layout == "tb" and time_dim is None and (fwd.axes.B, fwd.axes.T) == (expect[1], expect[0]):
        raise _TimeMajor()
    return _as_profile(fwd, grad, loss_name, seed)


_FUSED = (nn.RNN, nn.LSTM, nn.GRU)


def _streams(call: ModelCall, *, at, time_dim, loss) -> bool:
    """The profile streams over time (`streamed_profile`) when the model is a plain fused
    nn.RNN/LSTM/GRU (batch_first, one direction, no hooks, no dropout masks to draw) measured at
    its input with "last"/"all" on a dense batch large enough to matter (`stream.large`)."""
    m, x = call.model, call.inputs
    if type(m) not in _FUSED or call.args or call.kwargs or at not in (None, "input") \
            or time_dim is not None or loss not in ("last", "all"):
        return False
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 3):
        return False
    if not m.batch_first or m.bidirectional or m.proj_size or x.shape[-1] != m.input_size:
        return False
    if m._forward_hooks or m._forward_pre_hooks or nn.modules.module._global_forward_hooks \
            or nn.modules.module._global_forward_pre_hooks:
        return False
    from .recurrent import describe

    spec = describe(m)
    return stream.streamable(spec) and stream.large(spec, x.shape[0], x.shape[1])


def streamed_profile(model: nn.Module, x: torch.Tensor, *, loss: str = "last", seed=None,
                     chunk: int | None = None) -> GradientProfile:
    """The gradient profile of a fused, unidirectional, batch_first nn.RNN/LSTM/GRU at its
    input, in chunks of time: memory O(B·T·N) instead of the fused kernel's whole graph.

    Checkpointed backpropagation through the module itself: one forward without a graph keeps
    the (L, B, ·) state entering each chunk of `chunk` steps; then from the last chunk to the
    first, the module is called on the chunk from that state with a graph, and one
    autograd.grad seeded with the loss's output gradient (`loss` "last" or "all": the sum of
    the output features at the last step or at every step) and the gradient the next chunk sent
    to its final state gives ∂L/∂x for the chunk and the gradient of the state entering it.
    Equal to the one-graph profile to float rounding. x (B, T, I).
    """
    from .recurrent import describe

    spec = describe(model)
    B, T = x.shape[:2]
    chunk = chunk or stream.chunk_steps(spec, B)
    bounds = list(range(0, T, chunk))
    with torch.no_grad():  # the state entering each chunk
        starts, state = [], None
        for a in bounds:
            starts.append(state)
            _, state = model(x[:, a:a + chunk], state)
    per_sample = torch.empty(B, T, dtype=torch.float64)
    bad_in = bad_grad = 0
    carry = None
    dtype = x.dtype
    for a, state in zip(reversed(bounds), reversed(starts)):
        xk = x[:, a:a + chunk].detach().requires_grad_(True)
        st = _state_leaves(state)
        with cudnn_guard(model, xk), torch.enable_grad():
            out, last = model(xk, st)
        g_out = torch.zeros_like(out) if loss == "last" else torch.ones_like(out)
        if loss == "last" and a + chunk >= T:
            g_out[:, -1] = 1
        outs, seeds = [out], [g_out]
        if carry is not None:
            outs += list(last) if isinstance(last, tuple) else [last]
            seeds += list(carry)
        leaves = [xk] + ([] if st is None else (list(st) if isinstance(st, tuple) else [st]))
        with cudnn_guard(model, xk):
            grads = torch.autograd.grad(outs, leaves, seeds, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        gx = grads[0]
        per_sample[:, a:a + chunk] = gx.to("cpu", torch.float64).norm(dim=-1)
        bad_in += count_nonfinite(xk.detach())
        bad_grad += count_nonfinite(gx)
        carry = grads[1:] if st is not None else None
    if bad_in or bad_grad:
        warnings.warn(f"gradient_profile: {bad_in} non-finite input value(s) at 'input' and "
                      f"{bad_grad} non-finite gradient value(s); affected norms are NaN/Inf and "
                      "the summaries nan", RuntimeWarning, stacklevel=4)
    config = {"seq_len": T, "samples": B, "seed": seed,
              "dtype": str(dtype).replace("torch.", ""), "device": str(x.device),
              "site": "input", "time_dim": None}
    return GradientProfile(per_sample, loss, bad_in, bad_grad, config, lengths=None,
                           site="input")


def _sample_group(call: ModelCall, *, at, time_dim, loss) -> int:
    """Samples per group when the profile of rnnscope's own causal Transformer is taken a
    group of samples at a time (0: in one batch). Attention mixes time, so it cannot stream
    over time; its samples are independent, so groups of samples give the same per-sample
    gradients with a fraction of the activations. Only past stream.STREAM_STEPS steps, so
    shorter runs are unchanged."""
    from .models import CausalTransformer

    m, x = call.model, call.inputs
    if type(m) is not CausalTransformer or call.args or call.kwargs \
            or at not in (None, "input") or time_dim is not None or loss not in ("last", "all"):
        return 0
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 3):
        return 0
    B, T = x.shape[:2]
    if T <= stream.STREAM_STEPS or m._forward_hooks or m._forward_pre_hooks:
        return 0
    group = max(1, stream.GROUP_SAMPLE_STEPS // T)
    return group if group < B else 0


def _grouped_profile(call: ModelCall, group: int, *, at, time_dim, loss, loss_name,
                     seed, drawn: bool) -> GradientProfile:
    """`_profile` on groups of `group` samples, joined: the same per-sample gradients."""
    x = call.inputs
    parts = []
    for a in range(0, x.shape[0], group):
        fwd, grad = site_gradients(call.replace(x[a:a + group]), at=at, time_dim=time_dim,
                                   loss=loss, drawn=drawn)
        parts.append(_as_profile(fwd, grad, loss_name, seed))
    per_sample = torch.cat([p.per_sample for p in parts])
    config = dict(parts[0].config, samples=int(per_sample.shape[0]))
    return GradientProfile(per_sample, loss_name, sum(p.nonfinite_inputs for p in parts),
                           sum(p.nonfinite_grads for p in parts), config, lengths=None,
                           site=parts[0].site)


def _state_leaves(state):
    """The state a chunk starts from, detached and requiring grad (None: zeros, no gradient
    needed — nothing before the first chunk)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(t.detach().requires_grad_(True) for t in state)
    return state.detach().requires_grad_(True)


def _as_profile(fwd: SiteForward, grad: torch.Tensor, loss_name: str, seed) -> GradientProfile:
    return profile_of_gradient(grad, fwd.tensors, loss_name=loss_name, seed=seed,
                               site=fwd.site, time_dim=fwd.time_dim, lengths=fwd.axes.lengths,
                               stacklevel=5)


def profile_of_gradient(grad: torch.Tensor, site_tensors, *, loss_name: str, seed,
                        site: str = "input", time_dim: int | None = None, lengths=None,
                        stacklevel: int = 4) -> GradientProfile:
    """The `GradientProfile` of ∂L/∂x, grad (B, T, F) batch-major, measured at `site` on
    `site_tensors` (the tensors x was read from, checked for non-finite values)."""
    per_sample = grad.detach().to(device="cpu", dtype=torch.float64).norm(dim=-1)  # (B, T)
    bad_in = sum(count_nonfinite(t.detach()) for t in site_tensors)
    bad_grad = count_nonfinite(grad)
    if bad_in or bad_grad:
        warnings.warn(f"gradient_profile: {bad_in} non-finite input value(s) at {site!r} and "
                      f"{bad_grad} non-finite gradient value(s); affected norms are NaN/Inf and "
                      "the summaries nan", RuntimeWarning, stacklevel=stacklevel)
    config = {"seq_len": int(per_sample.shape[1]), "samples": int(per_sample.shape[0]),
              "seed": seed, "dtype": str(grad.dtype).replace("torch.", ""),
              "device": str(grad.device), "site": site, "time_dim": time_dim}
    return GradientProfile(per_sample, loss_name, bad_in, bad_grad, config, lengths=lengths,
                           site=site)


@public("compare", grad=True)
def compare(modules: Mapping[str, nn.Module], inputs: torch.Tensor | None = None, *,
            seq_len: int = 100, samples: int = 50, loss: Loss = "last", seed: int = 0,
            at=None, forward_args=(), forward_kwargs=None,
            time_dim: int | None = None) -> Comparison:
    """Gradient profiles of several models on the same inputs.

    Args:
        modules: name -> model (any module `gradient_profile` accepts), all taking the same
            inputs.
        inputs: batch-major (B, T, I) features shared by every model (a model whose recurrent
            submodule reads dimension 0 as time is given them transposed), or token ids /
            any first argument the models all take; None draws one seeded standard normal
            batch shared by all models.
        at, forward_args, forward_kwargs, time_dim, loss: as in `gradient_profile`, for every
            model.

    Example:
        >>> cmp = compare({"RNN": nn.RNN(4, 8), "LSTM": nn.LSTM(4, 8)}, seq_len=10, samples=3)
        >>> [row["model"] for row in cmp.table()]
        ['RNN', 'LSTM']
    """
    if not isinstance(modules, Mapping) or not modules:
        raise TypeError("modules must be a non-empty mapping name -> nn.Module; got "
                        f"{type(modules).__name__}")
    loss_name = check_loss_option(loss)
    for name, m in modules.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules[{name!r}] must be an nn.Module; got {type(m).__name__}")
    for name, m in modules.items():  # every model checked before any work, as gradient_profile
        x = inputs
        dtype, device = model_dtype_device(m)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.is_meta \
                and device.type != "meta":
            x = x.to(device=device, dtype=dtype)  # shared inputs are cast per model, as below
        try:
            check_model_call("compare", m, x, forward_args, forward_kwargs, at)
        except (TypeError, ValueError, RuntimeError) as e:
            e.args = (str(e).replace("compare: ", f"compare: modules[{name!r}]: ", 1),)
            raise
    if inputs is None:
        sizes = {name: model_input_size(m) for name, m in modules.items()}
        known = {v for v in sizes.values() if v is not None}
        if len(known) > 1:
            raise ValueError(f"all models must take the same input size to share inputs; got "
                             f"{sizes}")
        if not known:
            raise ValueError("cannot tell the models' input size; pass inputs")
        first = next(iter(modules.values()))
        base = random_inputs(first, seq_len=seq_len, samples=samples, seed=seed,
                             input_size=known.pop())
    else:
        if not isinstance(inputs, (torch.Tensor, PackedSequence)):
            raise TypeError(f"inputs must be a tensor or a PackedSequence; got "
                            f"{type(inputs).__name__}")
        base = inputs
    profiles = {}
    for name, model in modules.items():
        x = base
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            dtype, device = model_dtype_device(model)
            x = x.to(device=device, dtype=dtype)
        call = model_call(model, x, forward_args, forward_kwargs)
        floating = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 3
        if floating:
            profiles[name] = profile_drawn(call, at=at, time_dim=time_dim, loss=loss,
                                           seed=seed if inputs is None else None,
                                           sized_by_model=inputs is None)[0]
        else:
            profiles[name] = _profile(call, at=at, time_dim=time_dim, loss=loss,
                                      loss_name=loss_name, seed=None)
    return Comparison(profiles)
