"""pyboundary: the geometry of deep classifiers' decision boundaries in input space.

Margins (batched DeepFool, L2 and L-inf, whole space or subspaces such as blocks of the 2-D DCT),
boundary curvature, curvature-based detection of perturbed inputs, margin dynamics and region
topology, on compiled CPU/CUDA ops.

Public names are imported lazily, so ``import pyboundary`` stays fast and a missing optional
dependency only matters for the function that needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "backend": "ops",
    "dct2": "ops",
    "idct2": "ops",
    "dct_block_analysis": "ops",
    "dct_block_synthesis": "ops",
    "deepfool_select": "ops",
    "dct_matrix": "ops",
    # engine
    "deepfool": "deepfool",
    "DeepFoolResult": "deepfool",
    # subspaces
    "Subspace": "subspaces",
    "DCTDiagonal": "subspaces",
    "DCTGrid": "subspaces",
    "RandomSubspaces": "subspaces",
    "UserBasis": "subspaces",
    "Directions": "subspaces",
    "FullSpace": "subspaces",
    "parse_subspaces": "subspaces",
    # data and models
    "load_dataset": "data",
    "reference_model": "models",
    "load_model": "models",
    # margin scans
    "margin_scan": "margins",
    "MarginScan": "margins",
    "dct_flip": "transforms",
    "dct_lowpass": "transforms",
    "ResultStore": "store",
    # curvature and detection
    "principal_curvatures": "curvature",
    "mean_curvature": "curvature",
    "shared_curved_directions": "curvature",
    "relative_curvature": "curvature",
    "hessian_vector_product": "curvature",
    "CurvatureDetector": "detection",
    # dynamics and topology
    "MarginTracker": "tracking",
    "pgd": "adversarial",
    "find_path": "topology",
    "convex_combination_probability": "topology",
    "random_direction_robustness": "topology",
    "pgd_batch_transform": "adversarial",
    "band_energy": "adversarial",
    "learn_mask": "masks",
}

# submodules reachable as attributes (``pyboundary.models.build``) without an explicit import
_SUBMODULES = {
    "ops", "reference", "subspaces", "data", "models", "margins", "store", "plot",
    "transforms", "synthetic", "distributed", "curvature", "detection", "tracking", "adversarial",
    "topology", "masks", "stats", "utils", "cli",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

# The engine function shares its name with its module: bind it eagerly, so that a later
# ``import pyboundary.deepfool`` (done by every pipeline) cannot shadow it with the module.
from .deepfool import DeepFoolResult, deepfool  # noqa: E402


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyboundary' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__ + sorted(_SUBMODULES)
