"""Public entry points of the compiled ops, with a pure-PyTorch fallback.

Each function dispatches to ``torch.ops.pyboundary.<name>`` when the compiled extension
``pyboundary._C`` is loaded, and to the twin of the same name in :mod:`pyboundary.reference`
otherwise (with a single warning). Contracts (shapes, dtypes, units) are documented on the
twins in :mod:`pyboundary.reference`; both implementations are tested against each other.

NOTE: this module is completed by the compiled-ops work (issue 2): loading of ``_C``,
fake kernels and autograd registration live here.
"""

from __future__ import annotations

from . import reference
from .reference import dct_matrix  # noqa: F401  (re-exported helper)

dct2 = reference.dct2
idct2 = reference.idct2
dct_block_analysis = reference.dct_block_analysis
dct_block_synthesis = reference.dct_block_synthesis
deepfool_select = reference.deepfool_select


def backend() -> dict:
    """Which implementation is active: {'ops': 'compiled'|'reference', 'cuda_kernels': bool}."""
    return {"ops": "reference", "cuda_kernels": False}
