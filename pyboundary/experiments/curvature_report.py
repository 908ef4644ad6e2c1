"""Curvature statistics of a model at a set of inputs (what ``pyboundary curvature`` reports):
extreme principal curvatures, mean curvatures and the sorted curvature profile."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch import Tensor

from .._utils.plotting import pyplot, save_figure
from .._utils.results import Result, to_numpy_value
from .._utils.stats import summarize
from .._utils.validation import check_int
from ..geometry.curvature import DEFAULT_H_REL, mean_curvature, principal_curvatures
from ..geometry.curvature.hvp import check_curvature_inputs
from ..geometry.detection import AUTO_TOP_CLASSES

__all__ = ["CurvatureReport", "curvature_report"]

_ROWS = (("largest", "largest principal curvature (runner-up boundary)"),
         ("smallest", "smallest principal curvature (runner-up boundary)"),
         ("mean_runner_up", "mean curvature (runner-up boundary)"),
         ("mean_all", "mean curvature (mean over other classes)"))


def _mean_all_label(classes) -> str:
    """The label of the mean over other classes: all of them, or (an int) the most likely ones."""
    return _ROWS[-1][1] if classes is None else f"mean curvature (mean over the {classes} most likely others)"


@dataclass
class CurvatureReport(Result):
    """Curvature statistics at N inputs (curvatures in 1 / input units; sign convention of
    :mod:`pyboundary.geometry.curvature`).

    Attributes:
        largest, smallest, mean_runner_up, mean_all: :func:`pyboundary._utils.stats.summarize`
            dicts of, per input, the largest and the smallest principal curvature of the boundary
            with the runner-up class (Lanczos), the mean curvature of that boundary and the mean
            over the other classes (all, or the ``settings['classes']`` most likely; trace form,
            always at x).
        profile: (D - 1,) ascending principal curvatures of the runner-up boundary averaged over
            the first ``profile_samples`` inputs (dense), or None.
        profile_samples: int, inputs actually averaged in ``profile`` (min(profile_samples, N);
            0 when no profile was computed).
        forward_per_input, backward_per_input: model rows spent per input.
        settings: n, k, at, h_rel, scheme, n_dirs, classes (None: all other classes; an int: that
            many most likely) and whatever the caller adds (e.g. model, data).
    """

    largest: dict
    smallest: dict
    mean_runner_up: dict
    mean_all: dict
    profile: np.ndarray | None
    profile_samples: int
    forward_per_input: float
    backward_per_input: float
    settings: dict

    def summary(self) -> dict:
        return {**self.settings, **{key: getattr(self, key) for key, _ in _ROWS},
                "profile": None if self.profile is None else [float(v) for v in self.profile],
                "profile_samples": self.profile_samples, "forward_per_input": self.forward_per_input,
                "backward_per_input": self.backward_per_input}

    def format_summary(self) -> str:
        lines = [f"{'statistic':<52} {'median':>11} {'p5':>11} {'p95':>11} {'mean':>11} {'se':>10} {'n':>5}"]
        for key, label in _ROWS:
            if key == "mean_all":
                label = _mean_all_label(self.settings.get("classes"))
            s = getattr(self, key)
            lines.append(f"{label:<52} {s['median']:>11.4g} {s['p5']:>11.4g} {s['p95']:>11.4g} {s['mean']:>11.4g} "
                         f"{s['se']:>10.3g} {s['n_converged']:>5d}")
        lines.append(f"cost: {self.forward_per_input:.1f} forward + {self.backward_per_input:.1f} "
                     "backward rows per input")
        return "\n".join(lines)

    def to_numpy(self) -> dict:
        return {k: to_numpy_value(v) for k, v in self.summary().items()} | {"profile": self.profile}

    def save(self, out) -> list:
        """Write curvature.json and (if a profile was computed) curvature_profile.png to ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        if self.profile is not None:
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(np.arange(self.profile.size), self.profile)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("principal curvature index (sorted)")
            ax.set_ylabel("curvature (1 / input units)")
            ax.set_title(f"Curvature profile, runner-up boundary, mean of {self.profile_samples} inputs")
            paths.append(save_figure(fig, out / "curvature_profile.png"))
        with open(out / "curvature.json", "w") as fh:
            json.dump(self.summary(), fh, indent=2)
        paths.append(out / "curvature.json")
        return paths


def curvature_report(model: Callable, x: Tensor, *, k: int = 5, n_dirs: int = 20, h_rel: float = DEFAULT_H_REL,
                     scheme: str = "central", at: str = "input", profile_samples: int = 4, seed: int = 0,
                     top_classes="auto", batch_size: int | None = None) -> CurvatureReport:
    """Curvature statistics of ``model`` at inputs x (N, *shape).

    Args:
        model: callable (N, *shape) -> (N, L) logits (left unchanged).
        x: (N, *shape) inputs, at least 2 features each.
        k: principal curvatures at each end (Lanczos).
        n_dirs: random directions of the mean curvature.
        h_rel: finite-difference step relative to ||x_n||_2.
        scheme: finite differences 'central', 'forward' or 'exact'.
        at: 'input' or 'boundary' (the DeepFool boundary point) for the principal curvatures.
        profile_samples: inputs averaged in the dense profile (0: none; skipped for D > 4096).
        seed: seeds the random directions.
        top_classes: the other classes of the mean curvature: None (all), k (the k most likely)
            or 'auto' (all when L - 1 <= :data:`~pyboundary.geometry.detection.AUTO_TOP_CLASSES`,
            else that many most likely: each class costs 1 reverse and 2 forward rows per input,
            3000 rows on ImageNet for all 999).
        batch_size: input rows per model call (None: automatic).
    Returns:
        :class:`CurvatureReport`.
    """
    x = check_curvature_inputs(x)
    n, d = x.shape[0], x[0].numel()
    pc = principal_curvatures(model, x, k=min(k, d - 1), at=at, h_rel=h_rel, scheme=scheme, seed=seed,
                              batch_size=batch_size)
    if not (isinstance(top_classes, str) and top_classes == "auto"):
        top_classes = check_int("top_classes", top_classes, minimum=1, allow_none=True)
    mc = mean_curvature(model, x, classes=AUTO_TOP_CLASSES if top_classes == "auto" else top_classes, n_dirs=n_dirs, h_rel=h_rel, scheme=scheme, estimator="trace",
                        seed=seed, batch_size=batch_size)
    classes = None if mc.classes.shape[1] == mc.n_classes - 1 else int(mc.classes.shape[1])
    runner = mc.values.argmax(1, keepdim=True)  # largest F_i = f_i - f_pred: the runner-up class
    fw, bw = pc.n_forward + mc.n_forward, pc.n_backward + mc.n_backward
    profile = None
    m = min(max(profile_samples, 0), n)
    if m > 0 and d <= 4096:
        dense = principal_curvatures(model, x[:m], k=1, at=at, h_rel=h_rel, scheme=scheme, method="dense",
                                     batch_size=batch_size)
        profile = np.nanmean(dense.spectrum.detach().cpu().double().numpy(), 0)
        fw, bw = fw + dense.n_forward, bw + dense.n_backward
    valid = pc.valid.cpu().numpy()
    return CurvatureReport(
        largest=summarize(pc.largest[:, 0].double().cpu().numpy(), valid),
        smallest=summarize(pc.smallest[:, 0].double().cpu().numpy(), valid),
        mean_runner_up=summarize(mc.trace.gather(1, runner).squeeze(1).double().cpu().numpy()),
        mean_all=summarize(mc.trace.mean(1).double().cpu().numpy()),
        profile=profile,
        profile_samples=m if profile is not None else 0,
        forward_per_input=fw / n,
        backward_per_input=bw / n,
        settings={"n": n, "k": int(pc.largest.shape[1]), "at": at, "h_rel": h_rel, "scheme": scheme,
                  "n_dirs": n_dirs, "classes": classes},
    )
