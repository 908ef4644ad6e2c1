"""Evaluation of the curvature detector: calibration on clean inputs, scores of DeepFool-perturbed
copies and of a noise control, ROC/AUC, label recovery, curvature profiles."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .._utils.plotting import pyplot, save_figure
from .._utils.results import Result
from .._utils.rng import make_generator
from ..attacks.deepfool import deepfool
from ..geometry.curvature import principal_curvatures
from ..geometry.curvature.hvp import check_curvature_inputs
from ..geometry.detection import (
    DETECTION_H_REL,
    CurvatureDetector,
    RocCurve,
    auc_score,
    roc_curve,
)
from .detection_study import same_norm_noise

__all__ = ["DetectionEvaluation", "evaluate_detection"]


@dataclass
class DetectionEvaluation(Result):
    """Clean vs DeepFool-perturbed evaluation of a :class:`CurvatureDetector`.

    The clean inputs are split in two halves (seeded): the threshold is fitted on the first
    (calibration) half; the second half and the DeepFool-perturbed copies of it are scored.
    Rates are fractions in [0, 1].

    Attributes:
        accuracy: correct decisions over evaluation clean + perturbed inputs at the threshold.
        tpr: detection rate (flagged fraction) on the perturbed inputs.
        fpr: false alarms (flagged fraction) on the clean evaluation inputs.
        auc: ROC AUC (clean evaluation vs perturbed).
        recovery: perturbed inputs whose recovered label is the original prediction, among
            the flagged ones (NaN when none is flagged).
        recovery_all: the same rule applied to every perturbed input.
        recovery_nearest: baseline without curvature, the runner-up class (largest other
            logit) of every perturbed input.
        n_calibration: int, clean inputs the threshold was fitted on (N // 2).
        n_eval: int, clean evaluation inputs (N - N // 2).
        n_perturbed: int, perturbed copies scored (those where DeepFool converged and changed
            the label).
        threshold: the calibrated score threshold (1 / input units; scores above it are flagged).
        margin_median: median DeepFool L2 margin of the perturbed copies (input units).
        forward_per_input: model rows (forward) per scored input, calibration included.
        backward_per_input: model rows (reverse) per scored input, calibration included.
        inputs_per_s: scored inputs (calibration, clean and perturbed evaluation) per second.
        seconds: wall time (``time.perf_counter``) of the calibration and of the scoring of the
            clean and perturbed evaluation inputs (not the DeepFool attack, the noise control
            or the profiles).
        roc: the :class:`RocCurve` (clean evaluation vs perturbed).
        params: dict of the settings: n_dirs, h, h_rel, fpr_target, overshoot, estimator, seed.
        noise_auc, noise_fpr: control (``noise_control=True``): the evaluation inputs plus random
            Gaussian noise with the L2 norm of their DeepFool perturbations (labels unchanged) are
            scored as clean: AUC of those vs the perturbed inputs, and how many of them the
            threshold flags. A detector that reacts to *any* perturbation, not to the boundary
            crossing, has noise_auc ~ 0.5 and noise_fpr ~ tpr. NaN when not computed.
        profile_clean, profile_perturbed: (D - 1,) float64 numpy arrays, the ascending
            principal curvatures (dense spectrum, 1 / input units) averaged over up to
            ``profile_samples`` clean evaluation / perturbed inputs; None when
            profile_samples = 0 or D > 4096.
    """

    accuracy: float
    tpr: float
    fpr: float
    auc: float
    recovery: float
    recovery_all: float
    recovery_nearest: float
    n_calibration: int
    n_eval: int
    n_perturbed: int
    threshold: float
    margin_median: float
    forward_per_input: float
    backward_per_input: float
    inputs_per_s: float
    seconds: float
    roc: RocCurve
    params: dict
    noise_auc: float = float("nan")
    noise_fpr: float = float("nan")
    profile_clean: np.ndarray | None = None
    profile_perturbed: np.ndarray | None = None

    def summary(self) -> dict:
        keys = ("accuracy", "tpr", "fpr", "auc", "recovery", "recovery_all", "recovery_nearest", "n_calibration",
                "n_eval", "n_perturbed", "threshold", "margin_median", "forward_per_input", "backward_per_input",
                "inputs_per_s", "seconds", "noise_auc", "noise_fpr")
        return {k: getattr(self, k) for k in keys} | {"params": self.params}


    def format_summary(self) -> str:
        """A few lines summarising the evaluation."""
        recovery = ("no perturbed input flagged" if math.isnan(self.recovery)
                    else f"{100 * self.recovery:.1f}% of flagged perturbed inputs")
        return "\n".join([
            f"calibration: {self.n_calibration} clean inputs, threshold {self.threshold:.4g} "
            f"(target FPR {self.params['fpr_target']:.3g})",
            f"evaluation: {self.n_eval} clean + {self.n_perturbed} DeepFool-perturbed "
            f"(overshoot {self.params['overshoot']}, median L2 margin {self.margin_median:.4g})",
            f"detection accuracy {100 * self.accuracy:.1f}%  (TPR {100 * self.tpr:.1f}%, FPR {100 * self.fpr:.1f}%)  "
            f"AUC {self.auc:.4f}",
            f"label recovery {recovery} ({100 * self.recovery_all:.1f}% of all perturbed; runner-up class baseline "
            f"{100 * self.recovery_nearest:.1f}%)",
            f"noise control (clean + random noise of the same norm): AUC vs perturbed {self.noise_auc:.4f}, "
            f"flagged {100 * self.noise_fpr:.1f}%",
            f"cost: {self.forward_per_input:.1f} forward + {self.backward_per_input:.1f} backward rows per input, "
            f"{self.inputs_per_s:.1f} inputs/s",
        ])

    def save(self, out) -> list:
        """Write roc.png, curvature_profile.png (if profiles were computed) and results.json to ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plt = pyplot()
        paths = []
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(self.roc.fpr, self.roc.tpr, drawstyle="steps-post", label=f"curvature score (AUC {self.auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.scatter([self.fpr], [self.tpr], color="C3", zorder=3, label="calibrated threshold")
        ax.set_xlabel("false-positive rate (clean)")
        ax.set_ylabel("true-positive rate (DeepFool-perturbed)")
        ax.set_title("Curvature-based detection")
        ax.legend(loc="lower right", fontsize=8)
        paths.append(save_figure(fig, out / "roc.png"))
        if self.profile_clean is not None:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            idx = np.arange(self.profile_clean.size)
            ax.plot(idx, self.profile_clean, label="clean")
            ax.plot(idx, self.profile_perturbed, label="DeepFool-perturbed")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("principal curvature index (sorted)")
            ax.set_ylabel("curvature (1 / input units)")
            ax.set_title("Curvature profile, boundary with the runner-up class")
            ax.legend(fontsize=8)
            paths.append(save_figure(fig, out / "curvature_profile.png"))
        summary = self.summary()
        with open(out / "results.json", "w") as fh:
            json.dump(summary, fh, indent=2, default=float)
        paths.append(out / "results.json")
        return paths


def evaluate_detection(
    model: Callable,
    x: Tensor,
    *,
    n_dirs: int = 20,
    h=None,
    h_rel: float = DETECTION_H_REL,
    fpr: float = 0.05,
    overshoot: float = 0.02,
    estimator: str = "trace",
    seed: int = 0,
    batch_size: int | None = None,
    profile_samples: int = 0,
    noise_control: bool = True,
    deepfool_kwargs: dict | None = None,
) -> DetectionEvaluation:
    """Evaluate the curvature detector on clean inputs and their DeepFool-perturbed copies.

    Args:
        model: the classifier (never modified).
        x: (N, *shape) clean inputs, N >= 4.
        n_dirs, h, h_rel, estimator, batch_size: detector settings (:class:`CurvatureDetector`).
        fpr: target false-positive rate of the calibration.
        overshoot: DeepFool overshoot (unrefined DeepFool, L2, as in the published experiments).
        seed: seeds the calibration/evaluation split and the detector's directions.
        profile_samples: inputs of each kind for the dense curvature profile (0 = none).
        noise_control: also score noise-perturbed clean inputs (see ``noise_auc``).
        deepfool_kwargs: extra arguments for :func:`pyboundary.attacks.deepfool`.
    Returns:
        :class:`DetectionEvaluation`.
    """
    x = check_curvature_inputs(x)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"x must hold at least 4 inputs (2 to calibrate, 2 to evaluate), got {n}")
    order = torch.randperm(n, generator=make_generator(seed, "cpu")).to(x.device)
    cal, ev = x[order[: n // 2]], x[order[n // 2:]]
    kwargs = {"overshoot": overshoot, "refine": False, "p": 2}
    kwargs.update(deepfool_kwargs or {})
    adv = deepfool(model, ev, **kwargs)
    ok = adv.converged & (adv.adv_label != adv.orig_label)
    pert = (ev + adv.perturbation.to(ev.dtype))[ok]
    orig = adv.orig_label[ok]
    if pert.shape[0] == 0:
        raise ValueError("DeepFool found no perturbed copy of the evaluation inputs")
    det = CurvatureDetector(model, n_dirs=n_dirs, h=h, h_rel=h_rel, estimator=estimator, seed=seed,
                            batch_size=batch_size)
    t0 = time.perf_counter()
    det.fit(cal, fpr=fpr)
    clean_s = det.score_details(ev)
    pert_s = det.score_details(pert)
    seconds = time.perf_counter() - t0
    scored, n_fw, n_bw = det.n_scored, det.n_forward, det.n_backward
    t = det.threshold_
    clean_flag = clean_s.score > t
    pert_flag = pert_s.score > t
    recovered = pert_s.class_scores.nan_to_num(-math.inf).argmax(1)
    hit = recovered == orig.to(recovered.device)
    nearest = pert_s.curvature.classes.gather(1, pert_s.curvature.values.argmax(1, keepdim=True)).squeeze(1)
    n_flag = int(pert_flag.sum())
    roc = roc_curve(clean_s.score, pert_s.score)
    noise_auc = noise_fpr = float("nan")
    if noise_control:
        delta = adv.perturbation[ok].to(ev.dtype)
        noisy = same_norm_noise(ev[ok], delta.flatten(1).norm(dim=1), make_generator(seed + 1, "cpu"))
        noisy_s = det.score(noisy)
        noise_auc = auc_score(noisy_s, pert_s.score)
        noise_fpr = float((noisy_s > t).double().mean())
    profile_clean = profile_pert = None
    if profile_samples > 0:
        m = min(profile_samples, ev.shape[0], pert.shape[0])
        d = x[0].numel()
        kw = {"method": "dense", "k": 1, "h": h, "h_rel": h_rel, "batch_size": batch_size}
        if d <= 4096:
            pc = principal_curvatures(model, ev[:m], **kw)
            pp = principal_curvatures(model, pert[:m], **kw)
            profile_clean = np.nanmean(pc.spectrum.cpu().double().numpy(), 0)
            profile_pert = np.nanmean(pp.spectrum.cpu().double().numpy(), 0)
    margin = adv.margin[ok].double()
    return DetectionEvaluation(
        accuracy=float(((~clean_flag).sum() + pert_flag.sum()) / (clean_flag.numel() + pert_flag.numel())),
        tpr=float(pert_flag.double().mean()),
        fpr=float(clean_flag.double().mean()),
        auc=roc.auc,
        recovery=float(hit[pert_flag].double().mean()) if n_flag else float("nan"),
        recovery_all=float(hit.double().mean()),
        recovery_nearest=float((nearest == orig.to(nearest.device)).double().mean()),
        n_calibration=int(cal.shape[0]),
        n_eval=int(ev.shape[0]),
        n_perturbed=int(pert.shape[0]),
        threshold=float(t),
        margin_median=float(margin.median()),
        forward_per_input=n_fw / scored,
        backward_per_input=n_bw / scored,
        inputs_per_s=scored / seconds,
        seconds=seconds,
        roc=roc,
        noise_auc=noise_auc,
        noise_fpr=noise_fpr,
        params={"n_dirs": n_dirs, "h": h, "h_rel": h_rel, "fpr_target": fpr, "overshoot": overshoot,
                "estimator": estimator, "seed": seed},
        profile_clean=profile_clean,
        profile_perturbed=profile_pert,
    )
