"""Detection of perturbed inputs from the asymmetric curvature of decision boundaries.

The statistic of Fawzi et al. (2018, "Empirical study of the topology and geometry of deep
networks"): near natural images the decision boundaries are curved asymmetrically, and an input
pushed just across a boundary (an adversarial perturbation such as DeepFool's) sees that same
boundary from the other side, so its curvature changes sign.

Convention (see :mod:`pyboundary.curvature`): for a test input x with predicted class k, and
every other class i, ``kappa_i`` is the mean curvature of the boundary of F_i = f_i - f_k (normal
pointing out of the region of k; kappa_i > 0 when that boundary bends towards class i). The
detector's score is

    score(x) = -mean_{i != k} kappa_i(x)        (1 / input units)

so that it is *high for perturbed inputs*: on a classifier whose clean points see boundaries with
kappa > 0 (the region of the predicted class locally wraps around the other classes), a point
pushed across the boundary with class j sees that boundary with the opposite orientation, kappa < 0.
x is flagged perturbed when score(x) > threshold; the threshold is calibrated on clean inputs for
a target false-positive rate (:meth:`CurvatureDetector.fit`). The recovered label of a flagged
input is the class whose boundary shows the largest such curvature, argmax_i (-kappa_i); inputs
that are not flagged keep their predicted label.

The curvatures are the cheap "trace form" estimates of :func:`pyboundary.curvature.mean_curvature`
(second differences of the logits along T shared random directions and the J normals:
1 + 2 T + 3 J forward rows and J backward rows per input, J = L - 1), or its Hutchinson estimate.

Measured on the reference Fashion-MNIST CNN (benchmarks/README.md): AUC 0.87 against DeepFool
copies, but only 0.72 against clean inputs plus random noise of the same norm; part of the
signal is that any perturbation breaks the max-pool ties of exactly-zero backgrounds. The
published 93-97 % correct decisions were not reproduced there. Inputs whose score is NaN (a
class pair with zero gradient) are never flagged.

``register_cli(subparsers)`` adds ``pyboundary detect``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .curvature import DEFAULT_BATCH_SIZE, MeanCurvature, _check_positive_int, _check_x, mean_curvature

#: Default finite-difference step of the detector relative to ||x||_2. Smaller than the
#: curvature module's geometric default (0.05, about the DeepFool margin): on the reference
#: Fashion-MNIST CNN the AUC falls as h grows (0.87 at 0.003, 0.73 at 0.02, 0.64 at 0.05; see
#: benchmarks/README.md), also on the noise control. Chosen on that evaluation, not validated
#: on other models.
DETECTION_H_REL = 0.003

__all__ = [
    "DETECTION_H_REL",
    "CurvatureDetector",
    "DetectionScores",
    "RocCurve",
    "roc_curve",
    "auc_score",
    "evaluate_detection",
    "DetectionEvaluation",
    "format_report",
    "save_evaluation",
    "register_cli",
]


# --------------------------------------------------------------------------- ROC / AUC


@dataclass
class RocCurve:
    """Receiver operating characteristic of a score (higher = more likely perturbed).

    Attributes:
        fpr, tpr: (K,) false- and true-positive rates for ``score > thresholds``, from (0, 0) to
            (1, 1), non-decreasing.
        thresholds: (K,) the thresholds (the first is +inf).
        auc: area under the curve = P(score_pos > score_neg) + 1/2 P(equal).
        clean_scores, perturbed_scores: the scores used (numpy float64).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    clean_scores: np.ndarray
    perturbed_scores: np.ndarray


def _as_scores(name: str, s) -> np.ndarray:
    a = np.asarray(s.detach().cpu().numpy() if isinstance(s, Tensor) else s, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(a)).sum())} non-finite scores")
    return a


def auc_score(negative, positive) -> float:
    """Area under the ROC curve of scores, by the Mann-Whitney statistic (ties count 1/2).

    Args:
        negative: (n0,) scores of negatives (clean); positive: (n1,) scores of positives.
    Returns:
        P(pos > neg) + 0.5 P(pos == neg), in [0, 1]. O((n0 + n1) log(n0 + n1)).
    """
    neg, pos = _as_scores("negative", negative), _as_scores("positive", positive)
    both = np.concatenate([neg, pos])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_vals = both[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], both.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    r_pos = ranks[neg.size:].sum()
    u = r_pos - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def roc_curve(negative, positive) -> RocCurve:
    """ROC curve (flag when score > threshold) and AUC of negative (clean) vs positive scores."""
    neg, pos = _as_scores("negative", negative), _as_scores("positive", positive)
    thr = np.unique(np.concatenate([neg, pos]))[::-1]
    # flag when score > t: thresholds +inf, then each distinct value from the top
    fp = np.searchsorted(np.sort(neg), thr, side="right")
    tp = np.searchsorted(np.sort(pos), thr, side="right")
    fpr = np.r_[0.0, (neg.size - fp) / neg.size]
    tpr = np.r_[0.0, (pos.size - tp) / pos.size]
    thresholds = np.r_[np.inf, thr]
    # at thresholds just below the minimum everything is flagged
    fpr, tpr = np.r_[fpr, 1.0], np.r_[tpr, 1.0]
    thresholds = np.r_[thresholds, -np.inf]
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=auc_score(neg, pos),
                    clean_scores=neg, perturbed_scores=pos)


# --------------------------------------------------------------------------- detector


@dataclass
class DetectionScores:
    """Per-input output of :meth:`CurvatureDetector.score_details`.

    Attributes:
        score: (N,) detector score, -mean_i kappa_i (higher = more likely perturbed).
        class_scores: (N, L) -kappa_i per class i (NaN at the predicted class).
        predicted: (N,) int64 the model's labels.
        curvature: the underlying :class:`pyboundary.curvature.MeanCurvature`.
    """

    score: Tensor
    class_scores: Tensor
    predicted: Tensor
    curvature: MeanCurvature


class CurvatureDetector:
    """Flags perturbed inputs by the sign of the boundary curvature (scikit-learn style).

    Args:
        model: callable (N, *shape) -> (N, L) logits; never modified.
        n_dirs: T >= 1 random directions per input for the curvature estimates.
        h: finite-difference step (input units, > 0) or None for ``h_rel * ||x||_2``.
        h_rel: relative step when h is None (> 0; default :data:`DETECTION_H_REL`).
        threshold: decision threshold on :meth:`score`; None until :meth:`fit`.
        estimator: 'trace' (default; cheap, shared directions) or 'hutchinson'.
        scheme: 'central', 'forward' or 'exact' derivatives.
        seed: seed of the random directions (the same directions for every call).
        batch_size: rows per model call.
        top_classes: average over the ``top_classes`` other classes with the largest logits
            only (cost ~ 3 top_classes + 2T forward rows per input instead of 3 (L - 1) + 2T; for
            many-class models); None: all other classes, as in the published statistic.

    Attributes after fit: ``threshold_``, ``fpr_`` (requested), ``calibration_fpr_`` (achieved on
    the calibration set), ``n_calibration_``, ``clean_scores_``.
    """

    def __init__(self, model: Callable, n_dirs: int = 20, h=None, threshold: float | None = None, *,
                 h_rel: float = DETECTION_H_REL, estimator: str = "trace", scheme: str = "central",
                 seed: int | None = 0, batch_size: int = DEFAULT_BATCH_SIZE, top_classes: int | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable (N, ...) -> (N, L) logits, got {type(model).__name__}")
        self.model = model
        self.n_dirs = _check_positive_int("n_dirs", n_dirs)
        if h is not None and not isinstance(h, Tensor):
            if isinstance(h, bool) or not isinstance(h, (int, float)):
                raise TypeError(f"h must be a float or None, got {type(h).__name__}")
            if not (math.isfinite(h) and h > 0):
                raise ValueError(f"h must be > 0 and finite (a step in input units), got {h}")
        self.h = h
        if not (isinstance(h_rel, (int, float)) and math.isfinite(h_rel) and h_rel > 0):
            raise ValueError(f"h_rel must be a positive finite number, got {h_rel!r}")
        self.h_rel = float(h_rel)
        if estimator not in ("trace", "hutchinson"):
            raise ValueError(f"estimator must be 'trace' or 'hutchinson', got {estimator!r}")
        self.estimator = estimator
        if scheme not in ("central", "forward", "exact"):
            raise ValueError(f"scheme must be 'central', 'forward' or 'exact', got {scheme!r}")
        self.scheme = scheme
        self.seed = seed
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.top_classes = None if top_classes is None else _check_positive_int("top_classes", top_classes)
        self.threshold = None if threshold is None else self._check_threshold(threshold)
        self.threshold_ = self.threshold
        self.n_forward = 0
        self.n_backward = 0
        self.n_scored = 0

    @staticmethod
    def _check_threshold(t) -> float:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"threshold must be a finite float, got {t!r}")
        return float(t)

    def get_params(self) -> dict:
        return {"n_dirs": self.n_dirs, "h": self.h, "h_rel": self.h_rel, "threshold": self.threshold,
                "estimator": self.estimator, "scheme": self.scheme, "seed": self.seed,
                "batch_size": self.batch_size, "top_classes": self.top_classes}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"CurvatureDetector({args})"

    # ----------------------------------------------------------------- scoring

    def score_details(self, x: Tensor) -> DetectionScores:
        """Scores with their per-class parts. x: (N, *shape) finite inputs."""
        x = _check_x(x)
        classes, n_classes = None, None
        if self.top_classes is not None:
            classes, n_classes = self._top_classes(x)
        mc = mean_curvature(self.model, x, classes=classes, n_dirs=self.n_dirs, h=self.h, h_rel=self.h_rel,
                            scheme=self.scheme, estimator=self.estimator, seed=self.seed,
                            batch_size=self.batch_size)
        kappa = mc.trace if self.estimator == "trace" else mc.hutchinson
        n = x.shape[0]
        if n_classes is None:
            n_classes = mc.classes.shape[1] + 1
        per_class = torch.full((n, n_classes), float("nan"), dtype=kappa.dtype, device=kappa.device)
        per_class.scatter_(1, mc.classes, -kappa)
        self.n_forward += mc.n_forward
        self.n_backward += mc.n_backward
        self.n_scored += n
        return DetectionScores(score=-kappa.mean(1), class_scores=per_class, predicted=mc.reference, curvature=mc)

    def _top_classes(self, x: Tensor):
        """(N, c) the c other classes with the largest logits, and L (one forward row per input)."""
        from .curvature import _logits_rows, _Cost
        from .utils import model_guard

        cost = _Cost()
        with model_guard(self.model):
            logits = _logits_rows(self.model, x.reshape(x.shape[0], -1), tuple(x.shape[1:]), self.batch_size, cost)
        self.n_forward += cost.forward
        n_classes = logits.shape[1]
        c = min(self.top_classes, n_classes - 1)
        return logits.topk(c + 1, dim=1).indices[:, 1:], n_classes

    def score(self, x: Tensor) -> Tensor:
        """(N,) detection scores -mean_i kappa_i (1 / input units); higher = more likely perturbed."""
        return self.score_details(x).score

    # ----------------------------------------------------------------- calibration

    def fit(self, clean_x: Tensor, fpr: float = 0.05) -> "CurvatureDetector":
        """Calibrate the threshold on clean inputs so that at most a fraction fpr is flagged.

        The threshold is the smallest clean score t such that #(score > t) <= fpr * n.
        Args:
            clean_x: (n, *shape) clean inputs, n >= 1.
            fpr: target false-positive rate in (0, 1).
        Returns:
            self.
        """
        if not isinstance(fpr, (int, float)) or isinstance(fpr, bool) or not (0 < fpr < 1):
            raise ValueError(f"fpr must be a float in (0, 1), got {fpr!r}")
        if isinstance(clean_x, Tensor) and clean_x.dim() >= 1 and clean_x.shape[0] == 0:
            raise ValueError("clean_x is empty: calibration needs at least one clean input")
        scores = self.score(clean_x).detach().cpu().double().numpy()
        if not np.isfinite(scores).all():
            raise ValueError(f"{int((~np.isfinite(scores)).sum())} clean inputs got non-finite scores "
                             "(zero gradient?); remove them before calibrating")
        s = np.sort(scores)
        n = s.size
        allowed = int(math.floor(fpr * n + 1e-9))  # inputs allowed above the threshold
        t = s[n - 1 - allowed] if allowed < n else s[0]
        self.threshold_ = float(t)
        self.threshold = self.threshold_
        self.fpr_ = float(fpr)
        self.calibration_fpr_ = float((scores > t).mean())
        self.n_calibration_ = n
        self.clean_scores_ = scores
        return self

    def _require_threshold(self) -> float:
        if self.threshold_ is None:
            raise ValueError("CurvatureDetector has no threshold: call fit(clean_x) first or pass threshold=")
        return self.threshold_

    # ----------------------------------------------------------------- decisions

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Flag perturbed inputs and recover their labels.

        Returns:
            flagged (N,) bool (score > threshold) and recovered (N,) int64: for flagged inputs the
            class i maximising -kappa_i, otherwise the model's prediction.
        """
        t = self._require_threshold()
        det = self.score_details(x)
        flagged = det.score > t
        recovered = torch.where(flagged, det.class_scores.nan_to_num(-math.inf).argmax(1), det.predicted)
        return flagged, recovered

    def roc(self, clean_x: Tensor, perturbed_x: Tensor) -> RocCurve:
        """ROC curve and AUC of clean (negative) vs perturbed (positive) inputs."""
        return roc_curve(self.score(clean_x), self.score(perturbed_x))


# --------------------------------------------------------------------------- CLI


def register_cli(subparsers) -> None:
    """Add ``detect``: evaluate the detector on clean inputs and DeepFool-perturbed copies."""
    from .cli import positive_int

    p = subparsers.add_parser(
        "detect",
        help="curvature-based detection of DeepFool-perturbed inputs",
        description="Calibrate the curvature detector on half of the clean inputs (target FPR), then "
                    "evaluate it on the other half and on their DeepFool-perturbed copies: detection "
                    "accuracy at the threshold, AUC, label recovery; writes roc.png and "
                    "curvature_profile.png.",
    )
    p.add_argument("--model", required=True, help="model spec (see pyboundary.models.load_model), e.g. lenet-fmnist")
    p.add_argument("--data", required=True, help="dataset name or folder (pyboundary.data.load_dataset)")
    p.add_argument("--n", type=positive_int, default=200, help="number of test inputs (default 200)")
    p.add_argument("--out", default=None, help="folder for the plots and results.json (default: none written)")
    p.add_argument("--n-dirs", type=positive_int, default=20, help="random directions per input (default 20)")
    p.add_argument("--h-rel", type=float, default=DETECTION_H_REL,
                   help=f"finite-difference step relative to ||x|| (default {DETECTION_H_REL})")
    p.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate (default 0.05)")
    p.add_argument("--overshoot", type=float, default=0.02, help="DeepFool overshoot (default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-samples", type=int, default=4,
                   help="inputs for the curvature profile plot (dense Hessian; 0 = skip)")
    p.set_defaults(func=_cli_detect)


def _cli_detect(args) -> int:
    from .data import load_dataset
    from .models import load_model

    model = load_model(args.model)
    data = load_dataset(args.data, "test", limit=args.n, seed=args.seed)
    ev = evaluate_detection(model, data.x, n_dirs=args.n_dirs, h_rel=args.h_rel, fpr=args.fpr,
                            overshoot=args.overshoot, seed=args.seed,
                            profile_samples=args.profile_samples)
    print(f"pyboundary detect: model {args.model}, data {args.data} ({data.x.shape[0]} test inputs)")
    print(format_report(ev))
    if args.out:
        paths = save_evaluation(ev, args.out)
        print("wrote " + ", ".join(str(q) for q in paths))
    return 0


# --------------------------------------------------------------------------- evaluation


@dataclass
class DetectionEvaluation:
    """Clean vs DeepFool-perturbed evaluation of a :class:`CurvatureDetector`.

    The clean inputs are split in two halves (seeded): the threshold is fitted on the first
    (calibration) half; the second half and the DeepFool-perturbed copies of it are scored.
    Attributes (rates are fractions in [0, 1]):
        accuracy: correct decisions over evaluation clean + perturbed inputs at the threshold.
        tpr, fpr: detection rate on perturbed, false alarms on clean evaluation inputs.
        auc: ROC AUC (clean evaluation vs perturbed); roc: the :class:`RocCurve`.
        recovery: perturbed inputs whose recovered label is the original prediction, among
            the flagged ones; recovery_all: the same rule applied to every perturbed input;
            recovery_nearest: baseline without curvature, the runner-up class (largest other
            logit) of every perturbed input.
        n_calibration, n_eval, n_perturbed: counts (perturbed: DeepFool converged).
        threshold: the calibrated threshold; margin_median: median DeepFool L2 margin.
        forward_per_input, backward_per_input: model rows per scored input; inputs_per_s: scoring
            throughput; seconds: wall time of the scoring.
        noise_auc, noise_fpr: control (``noise_control=True``): the evaluation inputs plus random
            Gaussian noise with the L2 norm of their DeepFool perturbations (labels unchanged) are
            scored as clean: AUC of those vs the perturbed inputs, and how many of them the
            threshold flags. A detector that reacts to *any* perturbation, not to the boundary
            crossing, has noise_auc ~ 0.5 and noise_fpr ~ tpr. NaN when not computed.
        profile_clean, profile_perturbed: (D - 1,) sorted principal curvatures averaged over
            ``profile_samples`` inputs (dense), or None.
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
    batch_size: int = DEFAULT_BATCH_SIZE,
    profile_samples: int = 0,
    noise_control: bool = True,
    deepfool_kwargs: dict | None = None,
) -> DetectionEvaluation:
    """Evaluate the curvature detector on clean inputs and their DeepFool-perturbed copies.

    Args:
        model: the classifier (never modified); x: (N, *shape) clean inputs, N >= 4.
        n_dirs, h, h_rel, estimator, batch_size: detector settings (:class:`CurvatureDetector`).
        fpr: target false-positive rate of the calibration.
        overshoot: DeepFool overshoot (unrefined DeepFool, L2, as in the published experiments).
        seed: seeds the calibration/evaluation split and the detector's directions.
        profile_samples: inputs of each kind for the dense curvature profile (0 = none).
        noise_control: also score noise-perturbed clean inputs (see ``noise_auc``).
        deepfool_kwargs: extra arguments for :func:`pyboundary.deepfool`.
    Returns:
        :class:`DetectionEvaluation`.
    """
    import time

    from .curvature import principal_curvatures
    from .deepfool import deepfool
    from .utils import make_generator

    x = _check_x(x)
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
        gen = make_generator(seed + 1, "cpu")
        noise = torch.randn(delta.shape, generator=gen, dtype=delta.dtype).to(delta.device)
        flat_n = noise.reshape(noise.shape[0], -1)
        scale = delta.reshape(delta.shape[0], -1).norm(dim=1) / flat_n.norm(dim=1)
        noisy = ev[ok] + (flat_n * scale.unsqueeze(1)).reshape(delta.shape)
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


def format_report(ev: DetectionEvaluation) -> str:
    """A few lines summarising a :class:`DetectionEvaluation`."""
    return "\n".join([
        f"calibration: {ev.n_calibration} clean inputs, threshold {ev.threshold:.4g} "
        f"(target FPR {ev.params['fpr_target']:.3g})",
        f"evaluation: {ev.n_eval} clean + {ev.n_perturbed} DeepFool-perturbed "
        f"(overshoot {ev.params['overshoot']}, median L2 margin {ev.margin_median:.4g})",
        f"detection accuracy {100 * ev.accuracy:.1f}%  (TPR {100 * ev.tpr:.1f}%, FPR {100 * ev.fpr:.1f}%)  "
        f"AUC {ev.auc:.4f}",
        f"label recovery {100 * ev.recovery:.1f}% of flagged perturbed inputs "
        f"({100 * ev.recovery_all:.1f}% of all perturbed; runner-up class baseline "
        f"{100 * ev.recovery_nearest:.1f}%)",
        f"noise control (clean + random noise of the same norm): AUC vs perturbed {ev.noise_auc:.4f}, "
        f"flagged {100 * ev.noise_fpr:.1f}%",
        f"cost: {ev.forward_per_input:.1f} forward + {ev.backward_per_input:.1f} backward rows per input, "
        f"{ev.inputs_per_s:.1f} inputs/s",
    ])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_evaluation(ev: DetectionEvaluation, out) -> list:
    """Write roc.png, curvature_profile.png (if profiles were computed) and results.json to ``out``."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(ev.roc.fpr, ev.roc.tpr, drawstyle="steps-post", label=f"curvature score (AUC {ev.auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.scatter([ev.fpr], [ev.tpr], color="C3", zorder=3, label="calibrated threshold")
    ax.set_xlabel("false-positive rate (clean)")
    ax.set_ylabel("true-positive rate (DeepFool-perturbed)")
    ax.set_title("Curvature-based detection")
    ax.legend(loc="lower right", fontsize=8)
    paths.append(_savefig(plt, fig, out / "roc.png"))
    if ev.profile_clean is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        idx = np.arange(ev.profile_clean.size)
        ax.plot(idx, ev.profile_clean, label="clean")
        ax.plot(idx, ev.profile_perturbed, label="DeepFool-perturbed")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("principal curvature index (sorted)")
        ax.set_ylabel("curvature (1 / input units)")
        ax.set_title("Curvature profile, boundary with the runner-up class")
        ax.legend(fontsize=8)
        paths.append(_savefig(plt, fig, out / "curvature_profile.png"))
    summary = ev.summary()
    with open(out / "results.json", "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    paths.append(out / "results.json")
    return paths


def _savefig(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
