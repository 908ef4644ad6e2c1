"""Summary statistics of margin distributions, shared by scans and trackers."""

from __future__ import annotations

import numpy as np

__all__ = ["summarize", "standard_error"]


def standard_error(values: np.ndarray) -> float:
    """sqrt(sum (d - mean)^2) / n, the convention of the margin-dynamics study (NaN if empty)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return float("nan")
    return float(np.sqrt(np.sum((values - values.mean()) ** 2)) / n)


def summarize(values, converged=None) -> dict:
    """Median, 5th/95th percentiles, mean, standard error and counts of finite converged values.

    Args:
        values: (n,) margins; entries that are not finite or not converged are excluded from the
            statistics and counted as failures, never averaged in.
        converged: optional (n,) bool mask.
    Returns:
        dict with keys n, n_converged, n_failed, median, p5, p95, mean, se (floats; NaN if no value).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = np.isfinite(values)
    if converged is not None:
        ok &= np.asarray(converged, dtype=bool).reshape(-1)
    good = values[ok]
    nan = float("nan")
    return {
        "n": int(values.size),
        "n_converged": int(good.size),
        "n_failed": int(values.size - good.size),
        "median": float(np.median(good)) if good.size else nan,
        "p5": float(np.percentile(good, 5)) if good.size else nan,
        "p95": float(np.percentile(good, 95)) if good.size else nan,
        "mean": float(good.mean()) if good.size else nan,
        "se": standard_error(good),
    }
