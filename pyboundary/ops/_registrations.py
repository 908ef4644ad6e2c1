"""Fake (meta) kernels and autograd formulas of the compiled ops.

* a fake kernel for every op, so that ``torch.compile(fullgraph=True)`` traces code that calls them;
* autograd for ``dct2``/``idct2`` (each is the other's backward: the transform is orthonormal)
  and for ``dct_block_analysis``/``dct_block_synthesis`` (each is the other's adjoint; the integer
  block origins get no gradient). ``deepfool_select`` is not differentiable.

:func:`register` is called by :mod:`pyboundary.ops` for the ``pyboundary`` op namespace when the
compiled library is loaded; the test-only emulated CUDA library (tests/cuda_emu), whose ops have
the same schemas under another namespace, registers the same formulas for its namespace.
"""

from __future__ import annotations

import torch

from .reference import DEFAULT_SELECT_EPS

__all__ = ["register"]

_registered: set[str] = set()


def _dct2_fake(x):
    torch._check(x.dim() >= 2, lambda: f"dct2: x must have at least 2 dimensions, got {x.dim()}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _idct2_fake(x):
    torch._check(x.dim() >= 2, lambda: f"idct2: x must have at least 2 dimensions, got {x.dim()}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _analysis_fake(x, row0, col0, kh, kw):
    torch._check(x.dim() == 4, lambda: f"dct_block_analysis: x must be 4-D, got {x.dim()}")
    return x.new_empty((x.shape[0], x.shape[1], kh, kw))


def _synthesis_fake(coeffs, row0, col0, H, W):
    torch._check(coeffs.dim() == 4, lambda: f"dct_block_synthesis: coeffs must be 4-D, got {coeffs.dim()}")
    return coeffs.new_empty((coeffs.shape[0], coeffs.shape[1], H, W))


def _select_fake(gap, grad_gap, p, eps=DEFAULT_SELECT_EPS):
    torch._check(grad_gap.dim() == 3, lambda: "deepfool_select: grad_gap must be 3-D")
    n, m = grad_gap.shape[0], grad_gap.shape[2]
    return (
        grad_gap.new_empty((n, m)),
        gap.new_empty((n,), dtype=torch.int64),
        gap.new_empty((n,)),
    )


def _no_state(ctx, inputs, output):
    pass


def _analysis_setup(ctx, inputs, output):
    x, row0, col0, _, _ = inputs
    ctx.save_for_backward(row0, col0)
    ctx.image_size = (x.shape[2], x.shape[3])


def _synthesis_setup(ctx, inputs, output):
    coeffs, row0, col0, _, _ = inputs
    ctx.save_for_backward(row0, col0)
    ctx.block_size = (coeffs.shape[2], coeffs.shape[3])


def register(namespace: str = "pyboundary") -> None:
    """Register the fake kernels and autograd of every op of ``torch.ops.<namespace>`` (once)."""
    if namespace in _registered:
        return
    ns = getattr(torch.ops, namespace)

    def _dct2_backward(ctx, grad):
        return ns.idct2(grad)

    def _idct2_backward(ctx, grad):
        return ns.dct2(grad)

    def _analysis_backward(ctx, grad):
        row0, col0 = ctx.saved_tensors
        h, w = ctx.image_size
        return ns.dct_block_synthesis(grad, row0, col0, h, w), None, None, None, None

    def _synthesis_backward(ctx, grad):
        row0, col0 = ctx.saved_tensors
        kh, kw = ctx.block_size
        return ns.dct_block_analysis(grad, row0, col0, kh, kw), None, None, None, None

    fakes = {"dct2": _dct2_fake, "idct2": _idct2_fake, "dct_block_analysis": _analysis_fake,
             "dct_block_synthesis": _synthesis_fake, "deepfool_select": _select_fake}
    for name, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(f"{namespace}::dct2", _dct2_backward, setup_context=_no_state)
    torch.library.register_autograd(f"{namespace}::idct2", _idct2_backward, setup_context=_no_state)
    torch.library.register_autograd(f"{namespace}::dct_block_analysis", _analysis_backward,
                                    setup_context=_analysis_setup)
    torch.library.register_autograd(f"{namespace}::dct_block_synthesis", _synthesis_backward,
                                    setup_context=_synthesis_setup)
    _registered.add(namespace)
