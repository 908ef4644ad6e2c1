"""pyboundary: the geometry of deep classifiers' decision boundaries in input space.

Margins (batched DeepFool, L2 and L-inf, whole space or subspaces such as blocks of the 2-D DCT),
boundary curvature, curvature-based detection of perturbed inputs, margin dynamics and region
topology, on compiled CPU/CUDA ops.

This module is the curated public API: every public function together with the result class it
returns (see ``API.md`` for what semantic versioning covers). Layers, bottom to top:
``ops`` (compiled ops), ``zoo`` (data and models), ``subspaces``, ``attacks``, ``geometry`` and
``scans``, ``experiments``; the command line (``pyboundary.cli``) sits on top. Names are imported
lazily, so ``import pyboundary`` stays fast.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    # compiled ops
    "backend": "ops", "dct2": "ops", "idct2": "ops", "dct_block_analysis": "ops", "dct_block_synthesis": "ops",
    "deepfool_select": "ops", "dct_matrix": "ops",
    # attacks
    "deepfool": "attacks.deepfool", "DeepFoolResult": "attacks.deepfool",
    "pgd": "attacks.pgd", "pgd_batch_transform": "attacks.pgd",
    "universal_perturbation": "attacks.universal", "UniversalPerturbation": "attacks.universal",
    "evaluate_universal": "attacks.universal", "UniversalEvaluation": "attacks.universal",
    "fooling_rate": "attacks.universal",
    # subspaces
    "Subspace": "subspaces", "FullSpace": "subspaces", "DCTDiagonal": "subspaces", "DCTGrid": "subspaces",
    "RandomSubspaces": "subspaces", "UserBasis": "subspaces", "Directions": "subspaces",
    "parse_subspaces": "subspaces",
    # data and models
    "load_dataset": "zoo.data", "ImageDataset": "zoo.data", "load_package_photos": "zoo.photos",
    "T1": "zoo.synthetic", "T2": "zoo.synthetic",
    "open_image_folder": "zoo.streaming", "ImageFolderStream": "zoo.streaming",
    "SyntheticDataset": "zoo.synthetic", "reference_model": "zoo.cache", "train_cached": "zoo.cache",
    "derived_dataset": "zoo.data", "load_model": "zoo.specs",
    "build_model": None, "train": "zoo.training", "accuracy": "zoo.training",
    # margin scans and dynamics
    "margin_scan": "scans.margins", "MarginScan": "scans.margins", "ResultStore": "scans.store",
    "distributed_scan": "scans.distributed", "MarginTracker": "scans.tracking",
    "compare": "scans.comparison", "ScanComparison": "scans.comparison",
    # curvature, detection, topology, frequency analysis
    "principal_curvatures": "geometry.curvature", "PrincipalCurvatures": "geometry.curvature",
    "mean_curvature": "geometry.curvature", "MeanCurvature": "geometry.curvature",
    "shared_curved_directions": "geometry.curvature", "SharedDirections": "geometry.curvature",
    "relative_curvature": "geometry.curvature", "RelativeCurvature": "geometry.curvature",
    "noise_accuracy": "geometry.curvature", "NoiseAccuracy": "geometry.curvature",
    "subspace_fraction": "geometry.curvature", "hessian_vector_product": "geometry.curvature",
    "CurvatureDetector": "geometry.detection", "DetectionScores": "geometry.detection",
    "RocCurve": "geometry.detection", "roc_curve": "geometry.detection", "auc_score": "geometry.detection",
    "calibrate_threshold": "geometry.detection",
    "find_path": "geometry.topology", "PathResult": "geometry.topology",
    "path_connectivity": "geometry.topology", "PathConnectivity": "geometry.topology",
    "convex_combination_probability": "geometry.topology", "ConvexResult": "geometry.topology",
    "random_direction_robustness": "geometry.topology", "RandomDirectionResult": "geometry.topology",
    "learn_mask": "geometry.masks", "MaskResult": "geometry.masks",
    "band_energy": "geometry.spectral", "BandEnergy": "geometry.spectral",
    "dct_flip": "geometry.spectral", "dct_lowpass": "geometry.spectral",
    # study pipelines
    "evaluate_detection": "experiments.detection_eval", "DetectionEvaluation": "experiments.detection_eval",
    "detection_study": "experiments.detection_study", "DetectionStudy": "experiments.detection_study",
    "curvature_report": "experiments.curvature_report", "CurvatureReport": "experiments.curvature_report",
    "finetune_experiment": "experiments.finetune", "FinetuneResult": "experiments.finetune",
    "track": "experiments.tracking_run", "TrackingRun": "experiments.tracking_run",
    "run_entry": "experiments.reproduce", "ReproduceResult": "experiments.reproduce",
    "list_entries": "experiments.reproduce",
}
_RENAMED = {"build_model": ("zoo.architectures", "build")}

# subpackages reachable as attributes (``pyboundary.zoo.build``) without an explicit import
_SUBPACKAGES = ("ops", "zoo", "subspaces", "attacks", "geometry", "scans", "experiments", "adapters")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyboundary' has no attribute {name!r}")
    module, attr = _RENAMED.get(name, (_EXPORTS[name], name))
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__ + list(_SUBPACKAGES)
