"""Running a model the way every pipeline does: left as found, validated logits, batched predict."""

from __future__ import annotations

import contextlib
import contextvars
import re
import warnings
import weakref
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .batching import DEFAULT_BATCH_SIZE, plan_batch_size
from .memory import cpu_peak_supported

__all__ = [
    "model_guard", "check_logits", "forward_logits", "explain_input_errors", "model_device",
    "CallCounter", "predict", "forward_batch_size",
]


@contextlib.contextmanager
def model_guard(model: Callable, *, eval_mode: bool = True) -> Iterator[Callable]:
    """Run ``model`` in eval mode with frozen parameters, then restore it exactly.

    Inside the block every submodule is in eval mode (if ``eval_mode``) and every parameter has
    ``requires_grad=False``, so gradients with respect to the input never touch parameter
    ``.grad`` and cost no parameter-gradient work. On exit the per-module training flags and
    per-parameter ``requires_grad`` flags are restored, also when the block raises.
    Plain callables (not ``nn.Module``) pass through unchanged. The block runs outside
    ``torch.inference_mode`` even when the caller is inside it.
    """
    # Every pipeline differentiates through the model: lift an enclosing torch.inference_mode(),
    # under which torch.enable_grad() alone would not record a graph. inference_mode(False)
    # switches grad mode on, so the caller's grad mode is put back explicitly.
    grad_enabled = torch.is_grad_enabled()
    token = _guarded_model.set(model)
    try:
        with torch.inference_mode(False), torch.set_grad_enabled(grad_enabled), _reusable_compiled_graphs():
            if not isinstance(model, nn.Module):
                yield model
                return
            with _frozen(model, eval_mode):
                yield model
    finally:
        _guarded_model.reset(token)


def _reusable_compiled_graphs():
    """torch.compile's backward graphs donate their buffers unless told not to, and then refuse a
    second reverse pass through one forward (retain_graph=True): the engine differentiates several
    candidates per forward. Graphs compiled inside the block keep their buffers (a no-op for
    models that are not compiled, and on torch versions without the option)."""
    try:
        from torch._functorch import config
    except ImportError:  # pragma: no cover - torch without functorch
        return contextlib.nullcontext()
    if not hasattr(config, "donated_buffer"):  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return config.patch(donated_buffer=False)


@contextlib.contextmanager
def _frozen(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)


#: the model of the innermost model_guard block (whose outputs check_logits sees)
_guarded_model: contextvars.ContextVar = contextvars.ContextVar("pyboundary_guarded_model", default=None)
#: models already warned about returning probabilities (by identity; weakly held where possible)
_warned_models: weakref.WeakSet = weakref.WeakSet()
_warned_ids: set = set()


def _first_probability_warning() -> bool:
    """Whether the model being run (the innermost model_guard's; None outside one) has not been
    warned about returning probabilities yet; marks it warned."""
    model = _guarded_model.get()
    try:
        if model in _warned_models:
            return False
        _warned_models.add(model)
    except TypeError:  # None, or a callable that cannot be weakly referenced
        if id(model) in _warned_ids:
            return False
        _warned_ids.add(id(model))
    return True


def check_logits(logits: Tensor, n: int, *, where: str = "model") -> None:
    """Validate a model output: (n, L) floating logits with L >= 2, finite.

    Warns (once per model) when every row is non-negative and sums to 1, which means the model
    returns probabilities: margins of a softmax output are not margins of the logits.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"{where} must return a tensor of logits, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(
            f"{where} must return logits of shape (N, L) = ({n}, L) for {n} inputs, "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"{where} must return at least 2 classes, got L={logits.shape[1]} (a binary model with "
                         "one logit z: wrap it to return torch.cat([torch.zeros_like(z), z], 1), the logits "
                         "of the two classes)")
    if not logits.is_floating_point():
        raise TypeError(f"{where} must return floating-point logits, got {logits.dtype}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{where} returned non-finite logits (NaN or Inf)")
    if n > 0:
        with torch.no_grad():
            rows = logits.detach()
            sums = rows.sum(1)
            probabilities = bool((rows >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-4))
        if probabilities and _first_probability_warning():
            model = _guarded_model.get()
            name = "" if model is None else f" ({getattr(model, '__name__', type(model).__name__)})"
            warnings.warn(f"{where}{name} outputs look like probabilities (non-negative rows summing to 1); "
                          "pyboundary expects logits. Remove the final softmax for meaningful margins.",
                          stacklevel=3)


def forward_logits(model: Callable, x: Tensor, *, where: str = "model") -> Tensor:
    """model(x), validated with :func:`check_logits`."""
    out = model(x)
    check_logits(out, x.shape[0], where=where)
    return out


@contextlib.contextmanager
def explain_input_errors(model: Callable, x: Tensor, *, name: str = "x") -> Iterator[None]:
    """Turn a model failure caused by the input's dtype or shape into an error naming ``x``.

    A float64 ``x`` fed to a float32 model, or an (N, 28, 28) batch fed to a convolution that
    wants (N, 1, 28, 28), fails deep inside the model with a torch error about matrices or
    channels. Models that cast or reshape their input themselves are fine, so nothing is checked
    up front: only when the block raises a RuntimeError is it re-raised as a TypeError (x's dtype
    differs from the model's parameters: what to convert) or a ValueError (torch's message is
    about shapes: x's shape; or the logits have no gradient: the model detaches them), the
    model's own message kept.
    """
    try:
        yield
    except RuntimeError as err:
        param = None
        if isinstance(model, nn.Module):
            param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is not None and param.dtype != x.dtype:
            raise TypeError(
                f"the model failed on {name} of dtype {x.dtype}, and its parameters are {param.dtype}; "
                f"convert one of them (e.g. {name}.to({param.dtype}) or model.to({x.dtype})). "
                f"Model error: {err}"
            ) from err
        if "does not require grad" in str(err):
            raise ValueError(
                "the model's logits do not depend on its input through autograd (does it detach its "
                "output, run under torch.no_grad(), or compute outside torch?); pyboundary needs their "
                f"gradients with respect to {name}. Autograd error: {err}"
            ) from err
        if _SHAPE_ERROR.search(str(err)):
            raise ValueError(
                f"the model failed on {name}, inputs of shape {tuple(x.shape[1:])} (a batch of {x.shape[0]}): "
                f"give {name} the shape (N, ...) the model takes, e.g. (N, C, H, W) with the model's "
                f"channels. Model error: {err}"
            ) from err
        raise


#: torch's wording of shape mismatches inside a model (convolutions, linear layers, views)
_SHAPE_ERROR = re.compile(r"expected input\[|to have \d+ channels|shapes cannot be multiplied|size mismatch|"
                          r"is invalid for input of size|Expected \d+D|must match the size of tensor")


def model_device(model: Callable, default=None) -> torch.device | None:
    """Device of the model's first parameter or buffer (``default`` for plain callables)."""
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return None if default is None else torch.device(default)


class CallCounter:
    """Counts model evaluations: batched calls and evaluated input rows."""

    def __init__(self):
        self.calls = 0
        self.inputs = 0

    def add(self, rows: int) -> None:
        self.calls += 1
        self.inputs += int(rows)


def forward_batch_size(model: Callable, x: Tensor, batch_size: int | None = None, *, device=None,
                       memory_budget=None) -> int:
    """Rows per forward-only (no graph) call of ``model`` on inputs like x (N, ...).

    ``batch_size`` checked against the memory budget, or None: the largest that fits it, at most
    :data:`~pyboundary._utils.batching.DEFAULT_BATCH_SIZE` (at 224x224 a forward pass of 256 rows
    needs ~6 GB). The probe runs forward passes on rows of x (model left as found) once per
    model, input shape, dtype and device in a process (see
    :func:`pyboundary._utils.batching.plan_batch_size`); ``device``: where the model runs;
    ``memory_budget``: as for plan_batch_size (None: the default fraction of available memory).
    """
    dev = torch.device(device) if device is not None else model_device(model, x.device)

    def run(r: int) -> None:
        with torch.no_grad():
            forward_logits(model, x[torch.arange(r, device=x.device) % x.shape[0]].to(dev))

    if x.shape[0] == 0 or (dev.type == "cpu" and not cpu_peak_supported()):
        # nothing to probe, or a platform where CPU memory cannot be measured: the default, silently
        # (the pipelines that differentiate warn there; a forward pass is their small part)
        return plan_batch_size(run, DEFAULT_BATCH_SIZE, device=dev, batch_size=batch_size, memory_budget="off",
                               default=DEFAULT_BATCH_SIZE).batch_size
    with model_guard(model):
        return plan_batch_size(run, DEFAULT_BATCH_SIZE, device=dev, batch_size=batch_size, memory_budget=memory_budget,
                               default=DEFAULT_BATCH_SIZE, max_batch_size=DEFAULT_BATCH_SIZE, unit="rows",
                               reuse=(model, ("forward", tuple(x.shape[1:]), x.dtype))).batch_size


@torch.no_grad()
def predict(model: Callable, x: Tensor, *, batch_size: int | None = None, device=None,
            counter: CallCounter | None = None) -> Tensor:
    """Predicted classes argmax model(x) of inputs x (N, ...), batched.

    Args:
        model: callable (N, ...) -> (N, L) logits; left as found.
        x: (N, ...) inputs on any device.
        batch_size: input rows per model call (None: automatic, see :func:`forward_batch_size`).
        device: where the model runs (default: the model's device, else x's device); batches are
            moved there.
        counter: optional :class:`CallCounter` that counts the calls and rows.
    Returns:
        (N,) int64 labels on x's device.
    """
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    dev = torch.device(device) if device is not None else model_device(model, x.device)
    bs = forward_batch_size(model, x, batch_size, device=dev)
    out = []
    with model_guard(model):
        for start in range(0, n, bs):
            xb = x[start:start + bs].to(dev, non_blocking=True)
            out.append(forward_logits(model, xb).argmax(1).to(x.device))
            if counter is not None:
                counter.add(xb.shape[0])
    return torch.cat(out)
