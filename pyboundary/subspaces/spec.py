"""Text specs of subspace families (``dct:K=8,T=1``, ``random:dim=192,n=10``, ...) -> families."""

from __future__ import annotations

import re

from .base import FullSpace, Subspace, _image_shape
from .dct import DCTDiagonal, DCTGrid
from .dense import RandomSubspaces

__all__ = ["parse_subspaces"]


_SPEC_RE = re.compile(r"^\s*([a-zA-Z][\w-]*)\s*(?::\s*(.*))?$")


_KNOWN = {
    "full": set(),
    "dct": {"K", "T"},
    "dct-grid": {"K", "T"},
    "random": {"dim", "n", "seed"},
}


def _parse_args(kind: str, text: str | None, spec: str) -> dict[str, int]:
    args: dict[str, int] = {}
    if text is None or not text.strip():
        return args
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"subspace spec {spec!r}: expected key=value, got {part.strip()!r}")
        key, val = (s.strip() for s in part.split("=", 1))
        if key not in _KNOWN[kind]:
            allowed = ", ".join(sorted(_KNOWN[kind])) or "none"
            raise ValueError(f"subspace spec {spec!r}: unknown parameter {key!r} for {kind!r} (allowed: {allowed})")
        if key in args:
            raise ValueError(f"subspace spec {spec!r}: parameter {key!r} given twice")
        try:
            args[key] = int(val)
        except ValueError:
            raise ValueError(f"subspace spec {spec!r}: {key} must be an integer, got {val!r}") from None
    return args


def parse_subspaces(spec: str, image_shape) -> Subspace:
    """Build a subspace family from a text spec.

    Specs: ``full``; ``dct:K=8,T=2`` (DCT diagonal, T defaults to 1); ``dct-grid:K=8`` (optional
    ``T``, default K); ``random:dim=192,n=10,seed=0`` (n defaults to 1, seed to 0).

    Args:
        spec: the text spec (what :attr:`Subspace.spec` returns).
        image_shape: (C, H, W) or (H, W) of the inputs.
    Raises:
        ValueError naming the spec for unknown families or parameters, missing K/dim, and
        impossible settings (block larger than the image, T < 1, dim > D, ...).
    """
    if not isinstance(spec, str):
        raise TypeError(f"subspace spec must be a string, got {type(spec).__name__}")
    shape = _image_shape(image_shape)
    m = _SPEC_RE.match(spec)
    kind = m.group(1).lower() if m else None
    if kind in ("user", "directions"):
        raise ValueError(
            f"subspace spec {spec!r}: {kind} subspaces are built from tensors "
            "(UserBasis / Directions), not from a text spec"
        )
    if kind not in _KNOWN:
        raise ValueError(
            f"unknown subspace spec {spec!r}; expected one of: full, dct:K=8,T=1, dct-grid:K=8, "
            "random:dim=192,n=10,seed=0"
        )
    args = _parse_args(kind, m.group(2), spec)
    try:
        if kind == "full":
            return FullSpace(shape)
        if kind in ("dct", "dct-grid"):
            if "K" not in args:
                raise ValueError("K (block size) is required")
            if kind == "dct":
                return DCTDiagonal(shape, args["K"], args.get("T", 1))
            return DCTGrid(shape, args["K"], args.get("T"))
        if "dim" not in args:
            raise ValueError("dim is required")
        return RandomSubspaces(shape, args["dim"], args.get("n", 1), args.get("seed", 0))
    except ValueError as err:
        raise ValueError(f"subspace spec {spec!r} for image shape {shape}: {err}") from None
