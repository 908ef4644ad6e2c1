"""Margin scans (every (sample, subspace) pair of a dataset), their crash-safe result store,
multi-process sharding, margin tracking during training, comparisons of runs, and their figures."""

from .comparison import ScanComparison, compare
from .distributed import distributed_scan
from .margins import MarginScan, margin_scan
from .plots import plot_scan
from .store import ResultStore, StoreError
from .tracking import MarginTracker

__all__ = ["margin_scan", "MarginScan", "ResultStore", "StoreError", "distributed_scan", "MarginTracker",
           "plot_scan", "compare", "ScanComparison"]
