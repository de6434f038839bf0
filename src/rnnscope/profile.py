"""Input-gradient analysis: gradient_profile, compare.

The per-sample norm ‖∂L_s/∂x_{s,t}‖ for every sample s and timestep t comes from ONE batched
forward and ONE backward of Σ_s L_s with respect to the inputs only. That is exact because the
samples of a batch do not interact: ∂(Σ_r L_r)/∂x_s = ∂L_s/∂x_s. Anything that mixes samples
(batch norm in training mode, a loss that couples samples) breaks this; batch norm in training
mode is refused, a custom loss must return one independent loss per sample.

Only ∂L/∂inputs is taken (torch.autograd.grad with inputs=x), so the model's parameters, their
.grad, train/eval mode and requires_grad flags are left exactly as they were.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Mapping

import torch
from torch import nn

from .checks import count_nonfinite
from .results import Comparison, GradientProfile


def model_input_size(model: nn.Module) -> int:
    """The feature size a model's forward expects: its own `input_size`, else that of its first
    recurrent submodule."""
    size = getattr(model, "input_size", None)
    if isinstance(size, int):
        return size
    for m in model.modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            return m.input_size
    raise ValueError(f"cannot tell the input size of a {type(model).__name__}: it has no "
                     "`input_size` attribute and no recurrent submodule; pass `inputs` "
                     "explicitly")


def is_time_major(model: nn.Module) -> bool:
    """True when the model's forward takes (T, B, I): an nn.RNNBase with batch_first=False."""
    return isinstance(model, nn.RNNBase) and not model.batch_first


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(iter(model.parameters()), None)
    if p is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return p.dtype, p.device


def random_inputs(model: nn.Module, *, seq_len: int, samples: int, seed: int,
                  input_size: int | None = None) -> torch.Tensor:
    """Standard normal (samples, seq_len, I) batch-major inputs from a generator seeded with
    `seed`, drawn on the CPU (so the numbers do not depend on the device) and moved to the
    model's device and dtype."""
    for name, v in (("seq_len", seq_len), ("samples", samples)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    size = model_input_size(model) if input_size is None else input_size
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"input_size must be a positive int; got {size!r}")
    dtype, device = model_dtype_device(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, seq_len, size, generator=g, dtype=torch.float64).to(
        device=device, dtype=dtype)


def per_sample_loss(outputs: torch.Tensor, loss, batch: int) -> torch.Tensor:
    """(B,) per-sample losses from batch-major outputs (B, T, F) — or (B, F) for a model that
    returns only its final output."""
    if callable(loss):
        out = loss(outputs)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch,):
            raise ValueError(f"a loss callable must return per-sample losses of shape ({batch},); "
                             f"got {tuple(getattr(out, 'shape', ())) or type(out).__name__}")
        return out
    if outputs.dim() == 2:  # (B, F): the model already reduced time to its final output
        if loss == "all":
            raise ValueError("loss='all' needs the output sequence (B, T, F), but the model "
                             f"returned {tuple(outputs.shape)}")
        return outputs.sum(-1)
    if outputs.dim() != 3:
        raise ValueError(f"expected the model's output sequence (B, T, F); got "
                         f"{tuple(outputs.shape)}")
    if loss == "last":
        return outputs[:, -1].sum(-1)
    if loss == "all":
        return outputs.sum((1, 2))
    raise ValueError(f"loss must be 'last', 'all' or a callable(outputs) -> (B,) losses; "
                     f"got {loss!r}")


def _check_loss_option(loss) -> str:
    if callable(loss):
        return "custom"
    if loss not in ("last", "all"):
        raise ValueError(f"loss must be 'last', 'all' or a callable(outputs) -> (B,) losses; "
                         f"got {loss!r}")
    return loss


def _refuse_sample_mixing(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"{name or type(m).__name__} is batch norm in training mode: it "
                             "mixes the samples of a batch, so per-sample gradients from one "
                             "batched backward would be wrong; call model.eval() first")


def cudnn_guard(model: nn.Module, x: torch.Tensor):
    """cuDNN refuses RNN backward in eval mode; use PyTorch's own kernels there instead."""
    eval_rnn = any(isinstance(m, nn.RNNBase) and not m.training for m in model.modules())
    if x.is_cuda and eval_rnn:
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


def first_output(out) -> torch.Tensor:
    """The output sequence of a forward that returns a tensor or a tuple (sequence first)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor or a tuple whose first element is the "
                        f"output sequence; got {type(out).__name__}")
    return out


def input_gradients(model: nn.Module, x: torch.Tensor, loss="last") -> torch.Tensor:
    """∂(Σ_s L_s)/∂x for batch-major x (B, T, I) in one forward and backward; same shape as x.

    Leaves the model untouched (only the input gradient is taken).
    """
    _refuse_sample_mixing(model)
    time_major = is_time_major(model)
    x = x.detach().requires_grad_(True)
    with cudnn_guard(model, x), torch.enable_grad():
        out = first_output(model(x.transpose(0, 1) if time_major else x))
        if time_major and out.dim() == 3:
            out = out.transpose(0, 1)
        losses = per_sample_loss(out, loss, x.shape[0])
        (grad,) = torch.autograd.grad(losses.sum(), x, allow_unused=True)
    if grad is None:  # the output does not depend on the inputs at all
        grad = torch.zeros_like(x)
    return grad


def gradient_profile(model: nn.Module, inputs: torch.Tensor | None = None, *, seq_len: int = 100,
                     samples: int = 50, loss="last", seed: int = 0) -> GradientProfile:
    """Per-sample, per-timestep input-gradient norms ‖∂L_s/∂x_{s,t}‖ in one batched pass.

    Args:
        model: any nn.Module whose forward takes the input sequence — (B, T, I), or (T, B, I)
            for an nn.RNNBase with batch_first=False — and returns a tensor or a tuple whose
            first element is the output sequence (or the (B, F) final output).
        inputs: in the model's own layout; None draws standard normal (samples, seq_len, I)
            inputs from a torch.Generator seeded with `seed`.
        loss: "last" (sum of output features at the last step, the seed's choice), "all" (sum
            over all steps and features) or a callable(outputs (B, T, F) batch-major) -> (B,).

    Returns:
        A `GradientProfile`; non-finite inputs or gradients are counted in it and warned about.

    Example:
        >>> lstm = nn.LSTM(8, 16, batch_first=True)
        >>> prof = gradient_profile(lstm, seq_len=20, samples=4)
        >>> prof.per_sample.shape
        torch.Size([4, 20])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    loss_name = _check_loss_option(loss)
    if inputs is None:
        x = random_inputs(model, seq_len=seq_len, samples=samples, seed=seed)
    else:
        x = _inputs_batch_major(model, inputs)
    return _profile(model, x, loss, loss_name, seed=seed if inputs is None else None)


def _inputs_batch_major(model: nn.Module, inputs) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor; got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor; got dtype {inputs.dtype}")
    layout = "(T, B, I)" if is_time_major(model) else "(B, T, I)"
    if inputs.dim() != 3:
        raise ValueError(f"inputs must be {layout} for this {type(model).__name__}; got "
                         f"{tuple(inputs.shape)}")
    x = inputs.transpose(0, 1) if is_time_major(model) else inputs
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"inputs must have at least one sample and one timestep; got "
                         f"{tuple(inputs.shape)} {layout}")
    try:
        size = model_input_size(model)
    except ValueError:
        size = None
    if size is not None and x.shape[-1] != size:
        raise ValueError(f"inputs must be {layout} with I={size} for this "
                         f"{type(model).__name__}; got {tuple(inputs.shape)}")
    return x


def _profile(model, x, loss, loss_name, seed) -> GradientProfile:
    grad = input_gradients(model, x, loss)
    per_sample = grad.detach().to(device="cpu", dtype=torch.float64).norm(dim=-1)  # (S, T)
    bad_in, bad_grad = count_nonfinite(x), count_nonfinite(grad)
    if bad_in or bad_grad:
        warnings.warn(f"gradient_profile: {bad_in} non-finite input value(s) and {bad_grad} "
                      "non-finite gradient value(s); affected norms are NaN/Inf and the "
                      "summaries nan", RuntimeWarning, stacklevel=3)
    config = {"seq_len": int(x.shape[1]), "samples": int(x.shape[0]), "seed": seed,
              "dtype": str(x.dtype).replace("torch.", ""), "device": str(x.device)}
    return GradientProfile(per_sample, loss_name, bad_in, bad_grad, config)


def compare(models: Mapping[str, nn.Module], inputs: torch.Tensor | None = None, *,
            seq_len: int = 100, samples: int = 50, loss="last", seed: int = 0) -> Comparison:
    """Gradient profiles of several models on the same inputs.

    Args:
        models: name -> model (any model `gradient_profile` accepts), all with the same input
            size.
        inputs: batch-major (B, T, I) for every model (transposed for time-major ones); None
            draws one seeded standard normal batch shared by all models.

    Example:
        >>> cmp = compare({"RNN": nn.RNN(4, 8), "LSTM": nn.LSTM(4, 8)}, seq_len=10, samples=3)
        >>> [row["model"] for row in cmp.table()]
        ['RNN', 'LSTM']
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty mapping name -> nn.Module; got "
                        f"{type(models).__name__}")
    loss_name = _check_loss_option(loss)
    sizes = {name: model_input_size(m) for name, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"all models must take the same input size to share inputs; got {sizes}")
    first = next(iter(models.values()))
    if inputs is None:
        base = random_inputs(first, seq_len=seq_len, samples=samples, seed=seed)
    else:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
            raise ValueError("compare takes batch-major inputs (B, T, I); got "
                             f"{tuple(getattr(inputs, 'shape', ())) or type(inputs).__name__}")
        base = inputs
    profiles = {}
    for name, model in models.items():
        dtype, device = model_dtype_device(model)
        x = base.to(device=device, dtype=dtype)
        profiles[name] = _profile(model, x, loss, loss_name, seed if inputs is None else None)
    return Comparison(profiles)
