"""The curvature-detection study of Fawzi et al. (2018), Section 5, on any model and inputs.

Every clean input x is scored, and so are its DeepFool-perturbed copies x + alpha * delta (L2,
unrefined, inside the clamp box; alpha = 1, 2, 5 for the perturbation-scale study) and a noise
control for each alpha: x plus Gaussian noise with the norm of the perturbation actually applied.
From the per-input scores and per-class curvatures (:class:`pyboundary.CurvatureDetector`,
score = -mean_i kappa_i, higher = more likely perturbed) the study reports:

* AUC of clean vs perturbed inputs with a paired bootstrap 95 % confidence interval (inputs are
  resampled with their perturbed copies);
* TPR at a calibrated FPR (default 5 %), calibrated on a disjoint half: the inputs are split in
  two seeded halves, each half is decided with the threshold fitted on the clean scores of the
  other half (2-fold cross-calibration), and the decisions of both halves are pooled;
* label recovery by Algorithm 2's argmax rule (the recovered label of a perturbed input is the
  class i maximising -kappa_i) on flagged and on all perturbed inputs, with the runner-up class
  (largest other logit) as the baseline that needs no curvature;
* the noise control: AUC of noise-perturbed vs DeepFool-perturbed inputs (as high as the main
  AUC when the detector reacts to the boundary crossing, not to any perturbation), AUC of clean
  vs noise-perturbed inputs (0.5 then), and the fraction of noise inputs flagged;
* Table II's statistic: the fraction of (input, class) boundaries with positive mean curvature
  kappa_i at clean inputs, and with negative kappa_i at perturbed inputs (kappa_i is measured on
  the level set of F_i = f_i - f_pred through the input, the boundary as the detector sees it);
  also per input (the sign of the average over classes).

Sign convention: :mod:`pyboundary.geometry.detection` (kappa_i > 0 when the boundary bends towards
class i).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .._utils.model import model_guard, predict
from .._utils.plotting import pyplot, save_figure
from .._utils.results import Result, reading_saved
from .._utils.rng import make_generator
from .._utils.validation import check_number
from ..attacks.deepfool import deepfool
from ..geometry.curvature.hvp import check_curvature_inputs
from ..geometry.detection import DETECTION_H_REL, CurvatureDetector, auc_score, calibrate_threshold, roc_curve

__all__ = ["DetectionStudy", "detection_study", "same_norm_noise", "bootstrap_auc_ci"]


@dataclass
class DetectionStudy(Result):
    """Per-input scores of a :func:`detection_study` and the statistics derived from them.

    The arrays are numpy: N inputs, A = len(alphas), J scored classes per input. Scores are
    -mean_i kappa_i and curvatures kappa_i are in 1 / input units; float arrays hold NaN and int64
    arrays -1 where an entry does not exist (DeepFool failed or did not change the label, or no
    noise control at that alpha).

    Attributes:
        alphas: tuple of the A perturbation scales (floats).
        predicted: (N,) int64 clean predictions.
        margin: (N,) float64 ||delta||_2 of the DeepFool perturbation (input units; inf where
            DeepFool failed or did not change the label).
        half: (N,) int64 0/1, the seeded calibration half of each input.
        clean_score: (N,) float64 detector score of the clean inputs.
        clean_kappa: (N, J) float64 per-class mean curvature kappa_i at the clean inputs.
        clean_classes: (N, J) int64 the classes i of clean_kappa.
        pert_score: (A, N) float64 score of x + alpha delta (clipped to ``clamp``).
        pert_pred: (A, N) int64 prediction at x + alpha delta.
        pert_norm: (A, N) float64 ||perturbation applied||_2 after the clamp (input units), also
            the norm of the noise control.
        pert_kappa: (A, N, J) float64 per-class kappa_i at x + alpha delta.
        pert_classes: (A, N, J) int64 the classes i of pert_kappa.
        pert_runner_up: (A, N) int64 the scored class with the largest other logit at
            x + alpha delta (the baseline of label recovery).
        noise_score: (A, N) float64 score of the noise control (x + Gaussian noise of norm
            pert_norm).
        noise_pred: (A, N) int64 prediction at the noise control.
        noise_kappa: (A, N, J) float64 per-class kappa_i at the noise control.
        params: dict of the settings (n_dirs, h, h_rel, top_classes, estimator, fpr, clamp,
            overshoot, seed, n_bootstrap, noise_alphas, batch_size, n_classes_scored = J).
        cost: dict: forward_rows_per_scoring / backward_rows_per_scoring (model rows per scored
            input), cpu_s_per_scoring, scorings_per_input, deepfool_cpu_s_per_input,
            deepfool_forward_rows / deepfool_backward_rows (model rows of the DeepFool call, all
            inputs: the sums of its ``sample_forward`` / ``sample_gradients``), cpu_s_per_input
            (DeepFool + scorings, CPU seconds), wall_s and threads (torch threads).
        names: list of N input names (empty when none were given).
    """

    alphas: tuple
    predicted: np.ndarray
    margin: np.ndarray
    half: np.ndarray
    clean_score: np.ndarray
    clean_kappa: np.ndarray
    clean_classes: np.ndarray
    pert_score: np.ndarray
    pert_pred: np.ndarray
    pert_norm: np.ndarray
    pert_kappa: np.ndarray
    pert_classes: np.ndarray
    pert_runner_up: np.ndarray
    noise_score: np.ndarray
    noise_pred: np.ndarray
    noise_kappa: np.ndarray
    params: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    names: list = field(default_factory=list)

    # ------------------------------------------------------------------ statistics

    @property
    def n_inputs(self) -> int:
        return int(self.predicted.shape[0])

    def fooled(self, a: int) -> np.ndarray:
        """(N,) bool: the perturbed copy at alphas[a] exists and changes the prediction."""
        return np.isfinite(self.pert_score[a]) & (self.pert_pred[a] != self.predicted)

    def thresholds(self) -> np.ndarray:
        """(N,) the threshold each input is decided with: fitted on the other half's clean scores."""
        fpr = self.params.get("fpr", 0.05)
        out = np.empty(self.n_inputs)
        for h in (0, 1):
            other = self.clean_score[(self.half != h) & np.isfinite(self.clean_score)]
            out[self.half == h] = calibrate_threshold(other, fpr) if other.size else math.nan
        return out

    def alpha_summary(self, a: int) -> dict:
        """Statistics of the perturbation scale alphas[a] (see the module docstring)."""
        ok = self.fooled(a)
        scored = np.isfinite(self.clean_score)
        finite = ok & scored
        thr = self.thresholds()
        clean, pert = self.clean_score[finite], self.pert_score[a][finite]
        noise_ok = finite & np.isfinite(self.noise_score[a])
        noise = self.noise_score[a][noise_ok]
        flagged = self.pert_score[a] > thr
        rec = _argmax_rule(self.pert_kappa[a], self.pert_classes[a])
        hit = rec == self.predicted
        runner_up = self.pert_runner_up[a] == self.predicted
        seed = int(self.params.get("seed", 0))
        n_boot = int(self.params.get("n_bootstrap", 2000))
        out = {
            "alpha": float(self.alphas[a]),
            "n_perturbed": int(ok.sum()),
            "median_norm": _nanmedian(self.pert_norm[a][ok]),
            "auc": auc_score(clean, pert) if finite.any() else math.nan,
            "auc_ci95": list(bootstrap_auc_ci(clean, pert, n_boot, seed)) if finite.any() else [math.nan, math.nan],
            "tpr": _mean(flagged[ok]),
            "fpr": _mean((self.clean_score > thr)[scored]),
            "recovery_flagged": _mean(hit[ok & flagged]),
            "recovery_all": _mean(hit[ok]),
            "runner_up_baseline": _mean(runner_up[ok]),
            "noise_auc_vs_perturbed": auc_score(noise, self.pert_score[a][noise_ok]) if noise.size else math.nan,
            "noise_auc_vs_clean": auc_score(self.clean_score[noise_ok], noise) if noise.size else math.nan,
            "noise_flagged": _mean((self.noise_score[a] > thr)[noise_ok]),
            "noise_label_changed": _mean((self.noise_pred[a] != self.predicted)[noise_ok]),
            "table2_clean_positive": _sign_fraction(self.clean_kappa[scored], +1),
            "table2_perturbed_negative": _sign_fraction(self.pert_kappa[a][ok], -1),
            "table2_clean_inputs_positive": _mean(self.clean_score[scored] < 0),
            "table2_perturbed_inputs_negative": _mean(self.pert_score[a][ok] > 0),
        }
        return out

    def summary(self) -> dict:
        return {"n_inputs": self.n_inputs, "params": dict(self.params), "cost": dict(self.cost),
                "median_margin": _nanmedian(self.margin[np.isfinite(self.margin)]),
                "alphas": [self.alpha_summary(a) for a in range(len(self.alphas))]}

    def format_summary(self) -> str:
        """The results table (markdown) and the cost line."""
        s = self.summary()
        p = s["params"]
        head = ("| alpha | perturbed | median norm | AUC [95 % CI] | TPR @ FPR (cal.) | recovery flagged / all "
                "| runner-up | noise AUC vs pert. / vs clean | noise flagged | Table II clean + / pert. - |")
        lines = [
            f"{s['n_inputs']} clean inputs, median DeepFool L2 margin {s['median_margin']:.4g}; "
            f"T = {p.get('n_dirs')}, top classes {p.get('top_classes')}, h_rel {p.get('h_rel')}, "
            f"target FPR {p.get('fpr')} (2-fold cross-calibration)",
            "", head, "|" + "---|" * (head.count("|") - 1),
        ]
        for r in s["alphas"]:
            lines.append(
                f"| {r['alpha']:g} | {r['n_perturbed']} | {r['median_norm']:.3g} | {r['auc']:.3f} "
                f"[{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | {_pct(r['tpr'])} @ {_pct(r['fpr'])} "
                f"| {_pct(r['recovery_flagged'])} / {_pct(r['recovery_all'])} | {_pct(r['runner_up_baseline'])} "
                f"| {r['noise_auc_vs_perturbed']:.3f} / {r['noise_auc_vs_clean']:.3f} | {_pct(r['noise_flagged'])} "
                f"| {_pct(r['table2_clean_positive'])} / {_pct(r['table2_perturbed_negative'])} |")
        c = s["cost"]
        if c:
            lines += ["", f"cost per scored input: {c['forward_rows_per_scoring']:.1f} forward + "
                          f"{c['backward_rows_per_scoring']:.1f} backward model rows, "
                          f"{c['cpu_s_per_scoring']:.3g} CPU-s; per clean input (DeepFool + "
                          f"{c['scorings_per_input']} scorings): {c['cpu_s_per_input']:.3g} CPU-s "
                          f"({c['threads']} threads)"]
        return "\n".join(lines)

    # ------------------------------------------------------------------ storage

    def save(self, path) -> Path:
        """Write the arrays and settings to ``path`` (numpy's ``.npz`` format under the name given;
        no pickle); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        meta = {"alphas": list(self.alphas), "params": self.params, "cost": self.cost, "names": list(self.names)}
        with open(path, "wb") as fh:  # a file object: np.savez would append '.npz' to another name
            np.savez(fh, __meta__=np.array(json.dumps(meta, default=float)), **arrays)
        return path

    @classmethod
    def load(cls, path) -> "DetectionStudy":
        """Read a study written by :meth:`save` (any file name)."""
        with reading_saved(path, "DetectionStudy"):
            with np.load(Path(path), allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
            return cls(alphas=tuple(meta["alphas"]), params=meta["params"], cost=meta["cost"],
                       names=meta["names"], **arrays)

    # ------------------------------------------------------------------ figures

    def plot_roc(self, path=None):
        """ROC curves of clean vs perturbed inputs per alpha, and of noise vs perturbed (alpha 1)."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(4.8, 4.5))
        for a, alpha in enumerate(self.alphas):
            ok = self.fooled(a) & np.isfinite(self.clean_score)
            if ok.any():
                roc = roc_curve(self.clean_score[ok], self.pert_score[a][ok])
                ax.plot(roc.fpr, roc.tpr, drawstyle="steps-post", label=f"alpha {alpha:g} (AUC {roc.auc:.3f})")
        ok = self.fooled(0) & np.isfinite(self.noise_score[0])
        if ok.any():
            roc = roc_curve(self.noise_score[0][ok], self.pert_score[0][ok])
            ax.plot(roc.fpr, roc.tpr, "k--", drawstyle="steps-post", lw=1,
                    label=f"noise control, alpha {self.alphas[0]:g} (AUC {roc.auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("false-positive rate (clean / noise)")
        ax.set_ylabel("true-positive rate (DeepFool-perturbed)")
        ax.set_title("Curvature-based detection")
        ax.legend(loc="lower right", fontsize=7)
        return save_figure(fig, path)

    def plot_scores(self, path=None):
        """Score distributions: clean, perturbed and noise at each alpha (strip plot)."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        rows = [("clean", self.clean_score)]
        for a, alpha in enumerate(self.alphas):
            rows.append((f"pert. x{alpha:g}", np.where(self.fooled(a), self.pert_score[a], np.nan)))
            if np.isfinite(self.noise_score[a]).any():  # noise controls only where computed
                rows.append((f"noise x{alpha:g}", self.noise_score[a]))
        gen = np.random.default_rng(0)
        for k, (label, s) in enumerate(rows):
            s = s[np.isfinite(s)]
            ax.scatter(k + 0.15 * gen.uniform(-1, 1, s.size), s, s=8, alpha=0.7,
                       color="C0" if k == 0 else ("C3" if label.startswith("pert") else "C7"))
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=30, fontsize=8)
        ax.set_ylabel("score -mean kappa (1 / input units)")
        ax.set_title("Detector scores")
        return save_figure(fig, path)

    def write_report(self, out, *, title: str = "Curvature-based detection") -> list:
        """Write report.md, roc.png, scores.png and study.npz into the folder ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [self.plot_roc(out / "roc.png"), self.plot_scores(out / "scores.png"), self.save(out / "study.npz")]
        text = f"# {title}\n\n{self.format_summary()}\n\n![ROC](roc.png)\n\n![scores](scores.png)\n"
        (out / "report.md").write_text(text)
        with open(out / "summary.json", "w") as fh:
            json.dump(self.summary(), fh, indent=2, default=float)
        return [out / "report.md", out / "summary.json"] + paths


# ---------------------------------------------------------------------------- helpers


def same_norm_noise(x: Tensor, norms: Tensor, generator: torch.Generator | None) -> Tensor:
    """x plus Gaussian noise scaled to the per-input L2 norms (N,): the noise control of the
    detection studies (a perturbation as large as the adversarial one, in a random direction).
    The noise is drawn on the CPU from ``generator`` (reproducible across devices)."""
    g = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    scale = norms.to(x.dtype) / g.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    return x + g * scale.view(-1, *[1] * (x.dim() - 1))


def bootstrap_auc_ci(clean: np.ndarray, pert: np.ndarray, n_boot: int, seed: int, level: float = 0.95):
    """Percentile interval of the AUC over paired bootstrap resamples of the inputs.

    clean[k] and pert[k] belong to the same input; each resample draws inputs with replacement
    and keeps their pairs. Resamples with a single distinct input are skipped."""
    n = clean.size
    gen = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = gen.integers(0, n, n)
        aucs.append(auc_score(clean[idx], pert[idx]))
    lo, hi = np.quantile(np.asarray(aucs), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _argmax_rule(kappa: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Algorithm 2: the class i maximising -kappa_i (NaN entries never win; -1 when all NaN)."""
    neg = np.where(np.isfinite(kappa), -kappa, -np.inf)
    best = neg.argmax(1)
    out = np.take_along_axis(classes, best[:, None], 1)[:, 0].astype(np.int64)
    return np.where(np.isfinite(neg).any(1), out, -1)


def _sign_fraction(kappa: np.ndarray, sign: int) -> float:
    k = kappa[np.isfinite(kappa)]
    return float((np.sign(k) == sign).mean()) if k.size else math.nan


def _mean(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if np.size(mask) else math.nan


def _nanmedian(a: np.ndarray) -> float:
    return float(np.median(a)) if np.size(a) else math.nan


def _pct(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


# ---------------------------------------------------------------------------- pipeline


def detection_study(
    model: Callable,
    x: Tensor,
    *,
    alphas=(1.0, 2.0, 5.0),
    n_dirs: int = 20,
    h=None,
    h_rel: float | None = None,
    top_classes="auto",
    estimator: str = "trace",
    fpr: float = 0.05,
    clamp=(0.0, 1.0),
    overshoot: float = 0.02,
    seed: int = 0,
    batch_size: int | None = None,
    n_bootstrap: int = 2000,
    noise_alphas=None,
    names=None,
    deepfool_kwargs: dict | None = None,
    progress: bool = True,
) -> DetectionStudy:
    """Run the detection study (module docstring) on clean inputs ``x``.

    Args:
        model: classifier (N, ...) -> (N, L) logits, never modified.
        x: (N, ...) clean inputs, N >= 4.
        alphas: perturbation scales (> 0); the DeepFool perturbation delta is multiplied by each.
        n_dirs, h, h_rel, top_classes, estimator: detector settings
            (:class:`pyboundary.geometry.detection.CurvatureDetector`; h_rel None = its default).
        fpr: target false-positive rate of the calibration.
        clamp: (lo, hi) box of the inputs (DeepFool stays inside; x + alpha delta is clipped to it),
            or None.
        overshoot: DeepFool overshoot (unrefined L2 DeepFool, as in the published experiments).
        seed: seeds the halves, the noise, the detector's directions and the bootstrap.
        batch_size: model rows per call of the detector (None: automatic).
        n_bootstrap: bootstrap resamples of the AUC interval.
        noise_alphas: the alphas that get a noise control (None: all; each costs one scoring per
            input); the noise entries of the others are NaN.
        names: optional N labels of the inputs (kept in the result).
        deepfool_kwargs: extra arguments of :func:`pyboundary.deepfool`.
        progress: show a tqdm bar over the scoring.
    Returns:
        :class:`DetectionStudy`.
    """
    x = check_curvature_inputs(x)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"x must hold at least 4 inputs (two halves of 2), got {n}")
    alphas = tuple(float(a) for a in alphas)
    if not alphas or not all(math.isfinite(a) and a > 0 for a in alphas):
        raise ValueError(f"alphas must be positive finite numbers, got {alphas!r}")
    fpr = check_number("fpr", fpr, minimum=0, maximum=1, strict_minimum=True, strict_maximum=True)
    names = list(names) if names is not None else []
    if names and len(names) != n:
        raise ValueError(f"names must hold one name per input ({n}), got {len(names)}")
    h_rel = DETECTION_H_REL if h_rel is None else h_rel
    if batch_size is None:
        batch_size = _auto_rows(x)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with model_guard(model):
        predicted = predict(model, x.detach(), batch_size=batch_size)
    kw = {"p": 2, "overshoot": overshoot, "refine": False, "clamp": clamp, "batch_size": batch_size}
    kw.update(deepfool_kwargs or {})
    adv = deepfool(model, x, **kw)
    delta = adv.perturbation.to(x.dtype).detach()
    ok = adv.converged.to(torch.bool) & (adv.adv_label != adv.orig_label)
    margin = torch.where(ok, delta.flatten(1).norm(dim=1), torch.full((n,), math.inf, dtype=x.dtype))
    gen = make_generator(seed + 1, "cpu")
    pert, noisy, norms = [], [], []
    for alpha in alphas:
        xa = x + alpha * delta
        if clamp is not None:
            xa = xa.clamp(float(clamp[0]), float(clamp[1]))
        step = (xa - x).flatten(1).norm(dim=1)
        pert.append(xa)
        noisy.append(same_norm_noise(x, step, gen))
        norms.append(torch.where(ok, step, torch.full_like(step, math.nan)))
    df_cpu = time.process_time() - cpu0
    det = CurvatureDetector(model, n_dirs=n_dirs, h=h, h_rel=h_rel, estimator=estimator, seed=seed,
                            batch_size=batch_size, top_classes=top_classes)
    idx_ok = ok.nonzero().squeeze(1)
    groups = [("clean", x, torch.arange(n))]
    noise_alphas = alphas if noise_alphas is None else tuple(float(a) for a in noise_alphas)
    if not set(noise_alphas) <= set(alphas):
        raise ValueError(f"noise_alphas must be a subset of alphas {alphas}, got {noise_alphas}")
    empty = idx_ok[:0]
    for a in range(len(alphas)):
        groups.append((f"pert{a}", pert[a][idx_ok], idx_ok))
        keep = idx_ok if alphas[a] in noise_alphas else empty
        groups.append((f"noise{a}", noisy[a][keep], keep))
    total = sum(int(g[1].shape[0]) for g in groups)
    scored = {}
    t_score = time.process_time()
    bar = _bar(total, progress)
    for key, xs, index in groups:
        parts = []
        for s in range(0, xs.shape[0], 4):  # a few inputs per call: the bar moves, memory stays bounded
            parts.append(det.score_details(xs[s:s + 4]))
            bar.update(min(4, xs.shape[0] - s))
        scored[key] = (parts, index)
    bar.close()
    score_cpu = time.process_time() - t_score
    j = _n_scored_classes(scored["clean"][0])
    clean_s, clean_k, clean_c, _, _ = _collect(scored["clean"], n, j)
    A = len(alphas)
    shape = (A, n)
    pert_score, noise_score = np.full(shape, np.nan), np.full(shape, np.nan)
    pert_pred, noise_pred = np.full(shape, -1, dtype=np.int64), np.full(shape, -1, dtype=np.int64)
    pert_kappa, noise_kappa = np.full((A, n, j), np.nan), np.full((A, n, j), np.nan)
    pert_classes = np.full((A, n, j), -1, dtype=np.int64)
    pert_runner_up = np.full(shape, -1, dtype=np.int64)
    for a in range(A):
        pert_score[a], pert_kappa[a], pert_classes[a], pert_pred[a], pert_runner_up[a] = _collect(
            scored[f"pert{a}"], n, j)
        noise_score[a], noise_kappa[a], _, noise_pred[a], _ = _collect(scored[f"noise{a}"], n, j)
    threads = torch.get_num_threads()
    cost = {
        "forward_rows_per_scoring": det.n_forward / max(det.n_scored, 1),
        "backward_rows_per_scoring": det.n_backward / max(det.n_scored, 1),
        "cpu_s_per_scoring": score_cpu / max(total, 1),
        "scorings_per_input": 1 + A + len(noise_alphas),
        "deepfool_cpu_s_per_input": df_cpu / n,
        "deepfool_forward_rows": int(adv.sample_forward.sum()),
        "deepfool_backward_rows": int(adv.sample_gradients.sum()),
        "cpu_s_per_input": (df_cpu + score_cpu) / n,
        "wall_s": time.perf_counter() - wall0,
        "threads": threads,
    }
    order = torch.randperm(n, generator=make_generator(seed, "cpu"))
    half = np.zeros(n, dtype=np.int64)
    half[order[n // 2:].numpy()] = 1
    params = {"n_dirs": n_dirs, "h": h, "h_rel": h_rel, "top_classes": top_classes, "estimator": estimator,
              "fpr": fpr, "clamp": list(clamp) if clamp is not None else None, "overshoot": overshoot,
              "seed": seed, "n_bootstrap": n_bootstrap, "noise_alphas": list(noise_alphas), "batch_size": batch_size, "n_classes_scored": j}
    return DetectionStudy(
        alphas=alphas, predicted=predicted.cpu().numpy(), margin=margin.double().cpu().numpy(), half=half,
        clean_score=clean_s, clean_kappa=clean_k, clean_classes=clean_c,
        pert_score=pert_score, pert_pred=pert_pred, pert_norm=torch.stack(norms).double().cpu().numpy(),
        pert_kappa=pert_kappa, pert_classes=pert_classes, pert_runner_up=pert_runner_up, noise_score=noise_score, noise_pred=noise_pred,
        noise_kappa=noise_kappa, params=params, cost=cost, names=names)


def _auto_rows(x: Tensor) -> int:
    """Model rows per call when the caller gives none: 512 for small inputs, 2^21 / D for large ones
    (13 at 3 x 224 x 224: each row of EfficientNet-Lite0 with its graph held ~80 MB, measured)."""
    return int(max(1, min(512, 2 ** 21 // max(x[0].numel(), 1))))


def _n_scored_classes(parts) -> int:
    return int(parts[0].curvature.classes.shape[1])


def _collect(entry, n: int, j: int):
    """Scatter the detector outputs of one group back to the N inputs: score (N,), kappa (N, J),
    classes (N, J), predicted (N,), runner-up class (N,)."""
    parts, index = entry
    score = np.full(n, np.nan)
    kappa = np.full((n, j), np.nan)
    classes = np.full((n, j), -1, dtype=np.int64)
    pred = np.full(n, -1, dtype=np.int64)
    runner_up = np.full(n, -1, dtype=np.int64)
    if not parts:
        return score, kappa, classes, pred, runner_up
    idx = index.cpu().numpy()
    s = torch.cat([p.score for p in parts]).double().cpu().numpy()
    cls = torch.cat([p.curvature.classes for p in parts])
    # class_scores holds -kappa_i at column i: gather the scored classes, in the detector's order
    kap = -torch.cat([p.class_scores.gather(1, p.curvature.classes) for p in parts])
    score[idx] = s
    kappa[idx] = kap.double().cpu().numpy()
    classes[idx] = cls.cpu().numpy()
    pred[idx] = torch.cat([p.predicted for p in parts]).cpu().numpy()
    # runner-up: the scored class with the largest F_i = f_i - f_pred (the largest other logit)
    values = torch.cat([p.curvature.values for p in parts])
    runner_up[idx] = cls.gather(1, values.argmax(1, keepdim=True)).squeeze(1).cpu().numpy()
    return score, kappa, classes, pred, runner_up


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="detection study: scoring", unit="input", disable=not progress)
