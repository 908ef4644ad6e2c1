"""Model specs (as given on the command line) -> modules: built-in reference models, pretrained
networks, ``module:function``, TorchScript files and ``arch@state_dict.pt``."""

from __future__ import annotations

import importlib
import os
import warnings

import torch
from torch import Tensor, nn

from .._utils.model import model_guard
from .architectures import _BUILDERS, ARCHS, build
from .cache import canonical_dataset, load_state_file, reference_model
from .data import DATASETS, load_dataset
from .pretrained import PRETRAINED

__all__ = ["load_model"]


def _parse_builtin(spec: str):
    """'lenet-fmnist' -> ('lenet', 'fashion-mnist'), or None."""
    for arch in sorted(ARCHS, key=len, reverse=True):
        if spec.startswith(arch + "-"):
            dataset = canonical_dataset(spec[len(arch) + 1:])
            if dataset in DATASETS:
                return arch, dataset
    return None


def _load_module_function(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model spec {spec!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"model spec {spec!r}: {attr!r} is not callable")
    model = obj()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model spec {spec!r}: {attr}() must return an nn.Module, got {type(model).__name__}")
    return model.eval()


def _load_arch_file(arch: str, path: str, in_shape, n_classes) -> nn.Module:
    if arch not in _BUILDERS:
        raise ValueError(f"model spec '{arch}@{path}': unknown arch {arch!r}; valid: {list(ARCHS)}")
    if not os.path.isfile(path):
        raise ValueError(f"model spec '{arch}@{path}': no such file {path!r}")
    blob = load_state_file(path)
    if isinstance(blob, dict) and "state_dict" in blob and isinstance(blob.get("meta"), dict):
        meta = blob["meta"]
        in_shape = in_shape if in_shape is not None else meta.get("in_shape")
        n_classes = n_classes if n_classes is not None else meta.get("n_classes")
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, Tensor) for v in blob.values()):
        raise ValueError(f"{path!r} does not hold a state dict (name -> tensor)")
    if in_shape is None:
        raise ValueError(f"model spec '{arch}@{path}': in_shape (C, H, W) is required for a plain state dict")
    if n_classes is None:
        last = [v for k, v in blob.items() if k.endswith("bias")]
        if not last:
            raise ValueError(f"model spec '{arch}@{path}': n_classes is required")
        n_classes = int(last[-1].shape[0])
    model = build(arch, tuple(in_shape), int(n_classes))
    try:
        model.load_state_dict(blob)
    except RuntimeError as e:
        raise ValueError(f"{path!r} does not fit {arch} with in_shape={tuple(in_shape)}, "
                         f"n_classes={n_classes}: {e}") from e
    return model.eval()


def _load_file(path: str) -> nn.Module:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is what we were given
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu").eval()
    except Exception as jit_error:
        try:
            blob = load_state_file(path)
        except ValueError:
            raise ValueError(f"{path!r} is neither a TorchScript file nor a weights_only state dict "
                             f"(TorchScript said: {jit_error})") from None
        kind = "a state dict" if isinstance(blob, dict) else f"a {type(blob).__name__}"
        raise ValueError(f"{path!r} holds {kind}, not a TorchScript module: name the architecture, "
                         f"e.g. 'lenet@{path}' (archs: {list(ARCHS)})") from None


def load_model(spec: str, in_shape=None, n_classes: int | None = None, *, progress: bool = True) -> nn.Module:
    """A model from a command-line spec, in eval mode on CPU.

    Spec kinds:
        * built-in: ``<arch>-<dataset>`` (e.g. ``lenet-fmnist``, ``lenet-smooth-fmnist``,
          ``mlp-digits``, ``resnet-small-mnist5k``): :func:`reference_model` with its defaults (trained and cached
          on first use); ``efficientnet-lite0``: :func:`efficientnet_lite0`.
        * ``package.module:function``: imports the module and calls ``function()``, which must
          return an nn.Module.
        * a TorchScript file (``torch.jit.save``): loaded with ``torch.jit.load``.
        * ``<arch>@<file>``: a state dict saved with ``torch.save(model.state_dict(), file)`` (or a
          pyboundary cache file), loaded with ``weights_only=True`` into ``build(arch, in_shape,
          n_classes)``; in_shape is required unless the file records it, n_classes defaults to
          the size of the last bias.

    Args:
        spec: the spec string (or a path-like for a file).
        in_shape: optional per-sample input shape (C, H, W); when given, one forward pass on
            zeros checks that the model takes it (and gives ``n_classes`` logits when that is
            given).
        n_classes: optional number of classes (``<arch>@<file>`` specs; also checked with
            ``in_shape``). A built-in model is checked against the data it is trained on before
            it is trained.
        progress: the training bar of a built-in model that is not cached yet.
    Returns:
        the nn.Module, in eval mode on CPU.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"model spec must be a non-empty str, got {spec!r}")
    builtin = _parse_builtin(spec)
    if builtin is not None and in_shape is not None:
        _check_builtin_fits(spec, builtin[1], tuple(in_shape), n_classes)
    model = _load_spec(spec, in_shape, n_classes, progress)
    if in_shape is not None:
        _check_fits(model, spec, tuple(in_shape), n_classes)
    return model


def _check_fits(model, spec: str, in_shape: tuple, n_classes: int | None) -> None:
    """One forward pass on zeros: the model must take (1, *in_shape) and give (1, n_classes)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with model_guard(model), torch.no_grad():
        try:
            out = model(torch.zeros((1,) + in_shape, dtype=dtype))
        except RuntimeError as err:
            raise ValueError(f"model {spec!r} does not accept inputs of shape {in_shape} "
                             f"(the data's shape): {err}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"model {spec!r} must return (N, classes) logits, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    if n_classes is not None and out.shape[1] != n_classes:
        raise ValueError(f"model {spec!r} returns {out.shape[1]} classes but the data has {n_classes}")


def _check_builtin_fits(spec: str, dataset: str, in_shape: tuple, n_classes: int | None) -> None:
    """A built-in model is trained on ``dataset``: refuse other data before training it."""
    ref = load_dataset(dataset, split="test", limit=1)
    if ref.image_shape != in_shape or (n_classes is not None and ref.n_classes != n_classes):
        raise ValueError(f"model {spec!r} is trained on {dataset} ({ref.n_classes} classes of shape "
                         f"{ref.image_shape}); the data has {n_classes} classes of shape {in_shape}: "
                         "choose a model for this data (a built-in one named after it, or your own)")


def _load_spec(spec: str, in_shape, n_classes, progress: bool = True) -> nn.Module:
    if spec in PRETRAINED:
        return PRETRAINED[spec]()
    builtin = _parse_builtin(spec)
    if builtin is not None:
        return reference_model(*builtin, progress=progress)
    if os.path.isfile(spec):
        return _load_file(spec)
    if "@" in spec:
        arch, _, path = spec.partition("@")
        return _load_arch_file(arch, path, in_shape, n_classes)
    if ":" in spec:
        return _load_module_function(spec)
    names = [f"{a}-{d}" for a in ARCHS for d in ("fmnist", "digits", "mnist5k")] + list(PRETRAINED)
    raise ValueError(f"model spec {spec!r} is not a built-in name ({', '.join(names)}), an existing "
                     "TorchScript file, 'arch@state_dict.pt', or 'module:function'")
