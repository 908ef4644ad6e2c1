"""Figures of margin scans (matplotlib, Agg backend, PNG files).

* :func:`plot_margins` - margin vs subspace index: every (sample, subspace) margin as a faint
  point, the median per subspace as a line (split by correctly / wrongly classified samples when
  labels are known), the 5-95 % band, log y axis.
* :func:`plot_heatmap` - for grid families (``dct-grid``): the median margin of each DCT block
  as a 2-D map over (vertical, horizontal) frequency.
* :func:`plot_histograms` - distributions of log margins for a few subspaces (low, middle, high).
* :func:`plot_scan` - all that apply, into a folder.
* :func:`plot_comparison` - several runs (a :class:`~pyboundary.scans.comparison.ScanComparison`):
  median margins with their 5-95 % bands overlaid, and the differences to the first run with
  their bootstrap confidence intervals.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .._utils.plotting import pyplot, save_figure

__all__ = ["plot_scan", "plot_margins", "plot_heatmap", "plot_histograms", "plot_comparison"]

_COLORS = {"all": "#1f4e79", "correct": "#2a7f3f", "wrong": "#c0392b"}


def _norm_name(scan) -> str:
    names = {"L2": "‖δ‖₂", "L-inf": "‖δ‖∞", "L-inf of subspace coordinates": "‖coords(δ)‖∞"}
    return names[scan.norm_name]


def _good(scan) -> np.ndarray:
    """(n, s) bool: finite, converged margins."""
    m = scan.margins.numpy()
    return np.isfinite(m) & scan.converged.numpy() & (m > 0)


def _title(scan, what: str) -> str:
    model = (scan.meta.get("model") or {}).get("name", "model")
    data = (scan.meta.get("data") or {}).get("name", "data")
    return f"{what}\n{model} on {data}, {scan.subspace_spec}, n = {scan.n_samples}"


def _xticks(ax, labels) -> None:
    s = len(labels)
    step = max(1, int(math.ceil(s / 12)))
    ticks = list(range(0, s, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[t] for t in ticks], rotation=45 if s > 6 else 0, ha="right" if s > 6 else "center",
                       fontsize=8)


def _subspace_axis(spec: str) -> str:
    return "subspace (DCT block origin; low → high frequency)" if spec.startswith("dct") else "subspace index"


def plot_margins(scan, path) -> Path:
    """Margin vs subspace index (points per sample, median line, 5-95 % band, log y). Returns path."""
    plt = pyplot()
    m, good = scan.margins.numpy(), _good(scan)
    s = scan.n_subspaces
    fig, ax = plt.subplots(figsize=(max(6.5, 0.32 * s + 3), 4.6), dpi=120)
    rng = np.random.default_rng(0)
    groups = {"all": np.ones(scan.n_samples, dtype=bool)}
    if scan.labels is not None:
        ok = scan.correct.numpy()
        groups = {"correct": ok, "wrong": ~ok}
    for group, mask in groups.items():
        rows, cols = np.nonzero(good & mask[:, None])
        if rows.size == 0:
            continue
        jitter = rng.uniform(-0.18, 0.18, size=cols.size)
        alpha = float(np.clip(6.0 / np.sqrt(max(1, scan.n_samples)), 0.06, 0.5))
        ax.scatter(cols + jitter, m[rows, cols], s=6, alpha=alpha, color=_COLORS[group], linewidths=0,
                   rasterized=True)
        med = np.array([np.median(m[good[:, j] & mask, j]) if (good[:, j] & mask).any() else np.nan for j in range(s)])
        n_group = int(mask.sum())
        label = "median" if group == "all" else f"median, {group}ly classified (n = {n_group})"
        ax.plot(np.arange(s), med, color=_COLORS[group], lw=2.2, marker="o", ms=3.5, label=label)
    lo = np.array([np.percentile(m[good[:, j], j], 5) if good[:, j].any() else np.nan for j in range(s)])
    hi = np.array([np.percentile(m[good[:, j], j], 95) if good[:, j].any() else np.nan for j in range(s)])
    ax.fill_between(np.arange(s), lo, hi, color="0.5", alpha=0.15, lw=0, label="5-95 % of all samples")
    if good.any():
        ax.set_yscale("log")
    ax.set_xlim(-0.6, s - 0.4)
    _xticks(ax, list(scan.subspace_labels))
    ax.set_xlabel(_subspace_axis(scan.subspace_spec))
    ax.set_ylabel(f"margin {_norm_name(scan)} (input units)")
    failed = int((~good & scan.done.numpy()).sum())
    ax.set_title(_title(scan, "Distance to the decision boundary inside each subspace"), fontsize=10)
    if failed:
        ax.text(0.99, 0.02, f"{failed} pairs not flipped (left out)", transform=ax.transAxes, ha="right",
                fontsize=8, color="0.4")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.85)
    return save_figure(fig, path)


def plot_heatmap(scan, path) -> Path:
    """Median margin of each member of a grid family as a 2-D frequency map (log colour scale)."""
    if scan.grid_shape is None:
        raise ValueError(f"plot_heatmap needs a grid family (e.g. dct-grid:K=8), got {scan.subspace_spec!r}")
    plt = pyplot()
    from matplotlib.colors import LogNorm

    rows, cols = scan.grid_shape
    m, good = scan.margins.numpy(), _good(scan)
    med = np.array([np.median(m[good[:, j], j]) if good[:, j].any() else np.nan for j in range(scan.n_subspaces)])
    grid = med.reshape(rows, cols)
    fig, ax = plt.subplots(figsize=(5.6, 4.8), dpi=120)
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.min() > 0 else None
    im = ax.imshow(grid, cmap="viridis", norm=norm, origin="upper")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"median margin {_norm_name(scan)} (input units)")
    from matplotlib.ticker import FormatStrFormatter

    cb.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    cb.ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    if rows * cols <= 144 and finite.size:  # small grids: print the value in each cell
        mid = np.sqrt(finite.min() * finite.max())
        for r in range(rows):
            for c in range(cols):
                if np.isfinite(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if grid[r, c] < mid else "black")
    labels = list(scan.subspace_labels)
    ax.set_xticks(range(cols))
    ax.set_xticklabels([labels[c].split(",")[1].rstrip(")") for c in range(cols)], fontsize=8)
    ax.set_yticks(range(rows))
    ax.set_yticklabels([labels[r * cols].split(",")[0].lstrip("(") for r in range(rows)], fontsize=8)
    ax.set_xlabel("horizontal frequency (block origin column)")
    ax.set_ylabel("vertical frequency (block origin row)")
    ax.set_title(_title(scan, "Median margin per DCT block"), fontsize=10)
    return save_figure(fig, path)


def plot_histograms(scan, path, members=None) -> Path:
    """Histograms of the margins (log-spaced bins) of a few members (default: low, middle, high)."""
    plt = pyplot()
    s = scan.n_subspaces
    if members is None:
        members = sorted({0, s // 2, s - 1})
    m, good = scan.margins.numpy(), _good(scan)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    vals = m[good]
    if vals.size:
        bins = np.logspace(np.log10(vals.min()), np.log10(vals.max()) + 1e-9, 40)
        cmap = plt.get_cmap("plasma")
        for k, j in enumerate(members):
            v = m[good[:, j], j]
            if v.size:
                ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.35, color=cmap(k / max(1, len(members))),
                        edgecolor=cmap(k / max(1, len(members))), lw=1.5,
                        label=f"subspace {j} {scan.subspace_labels[j]} (median {np.median(v):.3g})")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"margin {_norm_name(scan)} (input units)")
    ax.set_ylabel("number of samples")
    ax.set_title(_title(scan, "Margin distributions"), fontsize=10)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def plot_scan(scan, path) -> list:
    """All figures that apply to ``scan``.

    Args:
        path: a folder (created if needed): writes margins.png, histograms.png and, for grid
            families, heatmap.png; or a file ending in .png: the main figure only (the heat map
            for grid families, else the margin plot).
    Returns:
        list of the Paths written.
    """
    path = Path(path)
    if path.suffix.lower() == ".png":
        return [plot_heatmap(scan, path) if scan.grid_shape is not None else plot_margins(scan, path)]
    out = [plot_margins(scan, path / "margins.png"), plot_histograms(scan, path / "histograms.png")]
    if scan.grid_shape is not None:
        out.append(plot_heatmap(scan, path / "heatmap.png"))
    return out


def plot_comparison(comp, path) -> Path:
    """Median margin per subspace of every run (lines, log y) with its 5-95 % band, and below it
    the difference of each run's median to the first run's with its bootstrap CI. Returns path."""
    plt = pyplot()
    s, r = comp.n_subspaces, comp.n_runs
    x = np.arange(s)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.5, 0.32 * s + 3), 6.4), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    colors = plt.get_cmap("tab10")
    for k in range(r):
        c = colors(k % 10)
        top.plot(x, comp.median[k], color=c, lw=2, marker="o", ms=3.5,
                 label=f"{comp.names[k]} ({comp.norms[k]}, n = {int(comp.n_samples[k])})")
        top.fill_between(x, comp.p5[k], comp.p95[k], color=c, alpha=0.15, lw=0)
    if np.isfinite(comp.p5).any() and np.nanmin(comp.p5) > 0:
        top.set_yscale("log")
    top.set_ylabel("median margin (input units)\nband: 5-95 % of samples")
    top.grid(True, which="major", alpha=0.3)
    top.legend(fontsize=8, loc="best", framealpha=0.85)
    top.set_title(f"Margins per subspace, {comp.subspace_spec}", fontsize=10)
    width = 0.6 / max(1, r - 1)
    for k in range(1, r):
        off = (k - 1 - (r - 2) / 2) * width
        d, lo, hi = comp.difference[k - 1], comp.ci_low[k - 1], comp.ci_high[k - 1]
        bottom.errorbar(x + off, d, yerr=[d - lo, hi - d], fmt="o", ms=3.5, color=colors(k % 10), capsize=2,
                        label=f"{comp.names[k]} - {comp.names[0]}")
    bottom.axhline(0.0, color="0.3", lw=0.8)
    bottom.set_ylabel(f"difference of medians\n({100 * comp.confidence:g} % bootstrap CI)")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=8, loc="best", framealpha=0.85)
    _xticks(bottom, list(comp.subspace_labels))
    bottom.set_xlabel(_subspace_axis(comp.subspace_spec))
    return save_figure(fig, path)
