"""Geometry of decision boundaries: curvature (:mod:`~pyboundary.geometry.curvature`), curvature-based
detection, region topology, frequency masks and spectral analysis."""

from .curvature import (
    MeanCurvature,
    NoiseAccuracy,
    PrincipalCurvatures,
    RelativeCurvature,
    SharedDirections,
    hessian_vector_product,
    mean_curvature,
    noise_accuracy,
    principal_curvatures,
    relative_curvature,
    shared_curved_directions,
    subspace_fraction,
)
from .detection import (
    CurvatureDetector,
    DetectionScores,
    RocCurve,
    auc_score,
    roc_curve,
)
from .masks import MaskResult, learn_mask
from .spectral import (
    BandEnergy,
    DCTFlip,
    DCTLowpass,
    band_energy,
    dct_flip,
    dct_lowpass,
)
from .topology import (
    ConvexResult,
    PathConnectivity,
    PathResult,
    RandomDirectionResult,
    convex_combination_probability,
    find_path,
    first_crossing,
    path_connectivity,
    random_direction_robustness,
)

__all__ = [
    "principal_curvatures", "PrincipalCurvatures", "mean_curvature", "MeanCurvature", "shared_curved_directions",
    "SharedDirections", "relative_curvature", "RelativeCurvature", "noise_accuracy", "NoiseAccuracy",
    "subspace_fraction", "hessian_vector_product",
    "CurvatureDetector", "DetectionScores", "RocCurve", "roc_curve", "auc_score",
    "find_path", "PathResult", "path_connectivity", "PathConnectivity", "convex_combination_probability",
    "ConvexResult", "random_direction_robustness", "RandomDirectionResult", "first_crossing",
    "learn_mask", "MaskResult", "band_energy", "BandEnergy", "dct_flip", "dct_lowpass", "DCTFlip", "DCTLowpass",
]
