"""Margin-scan throughput: pyboundary.margin_scan vs the published per-image, per-subspace method.

Published method (as in the reference code of margin-in-subspace studies): for each subspace a
dense basis matrix B (D x C*K^2) is built; for each image, plain DeepFool runs alone with the
basis: per iteration one forward pass, one reverse pass per candidate class over the retained
graph, the gradient differences projected as B^T g, the closest linearised boundary chosen in
coefficients, and the label tested at x0 + (1 + overshoot) r. Same model, candidates (10) and
overshoot (0.02) as ours (their max_iter 100, ours 50; every pair here converges well before);
ours additionally refines the boundary distance (extra forward passes).

Run (from the repo root):
    .venv/bin/python -m pytest benchmarks/bench_scan.py -o python_files='bench_*.py' -s \
        --benchmark-group-by=group --benchmark-columns=min,median,rounds
or as a script (prints the table):  .venv/bin/python benchmarks/bench_scan.py [--n 60] [--n-published 4] [--threads 1]

Both pairs per wall second and pairs per CPU second (``time.process_time``) are reported; on a
machine shared with other jobs, quote the CPU-time ratio at 1 thread (wall time there also
counts waiting for a core).

Model: the reference LeNet trained on Fashion-MNIST (``models.reference_model('lenet',
'fashion-mnist')``, cached), 28x28 test images, ``dct:K=8,T=1`` (21 subspaces). The published
method runs on a subset of the same (sample, subspace) pairs (every subspace of the first
``n_published`` images), as it is too slow for all; throughput is pairs per second.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from pyboundary import ops
from pyboundary import zoo as models
from pyboundary._utils.model import model_guard
from pyboundary.scans.margins import margin_scan
from pyboundary.subspaces import DCTDiagonal
from pyboundary.zoo import data

SPEC = "dct:K=8,T=1"
N_OURS = 60
N_PUBLISHED = 4
BAR = 20.0


def dense_basis(family: DCTDiagonal, member: int) -> torch.Tensor:
    """(D, m) dense orthonormal basis of one DCT block member (what the published code builds)."""
    m = family.dim
    eye = torch.eye(m, dtype=torch.float32)
    idx = torch.full((m,), member, dtype=torch.int64)
    return family.synthesis(eye, idx).reshape(m, -1).T.contiguous()


def published_subspace_deepfool(model, x0, basis, num_classes=10, overshoot=0.02, max_iter=100):
    """Plain DeepFool of one image (1, C, H, W) restricted to span(basis); returns the L2 margin.

    The structure of the published per-image method: per iteration a forward pass at the
    linearisation point x0 + B B^T r, one reverse pass for the reference class and one per other
    candidate (retained graph), each gradient difference projected with the dense basis, the
    closest boundary chosen, then a second forward pass at x0 + (1 + overshoot) r to test the label.
    """
    with torch.no_grad():
        order = model(x0)[0].argsort(descending=True)[:num_classes]
    label = int(order[0])
    flat = x0.reshape(-1)
    r = torch.zeros_like(flat)
    k_i, it = label, 0
    while k_i == label and it < max_iter:
        x = (flat + r).reshape(x0.shape).requires_grad_(True)
        fs = model(x)[0]
        grad_orig = torch.autograd.grad(fs[order[0]], x, retain_graph=True)[0].reshape(-1)
        pert, w = float("inf"), None
        for k in range(1, len(order)):
            w_k = torch.autograd.grad(fs[order[k]], x, retain_graph=True)[0].reshape(-1) - grad_orig
            f_k = (fs[order[k]] - fs[order[0]]).detach()
            pert_k = float(f_k.abs() / (basis.T @ w_k).norm())
            if pert_k < pert:
                pert, w = pert_k, w_k
        w = basis @ (basis.T @ w)
        r = r + max(pert, 1e-4) * w / w.norm()
        with torch.no_grad():
            k_i = int(model((flat + (1 + overshoot) * r).reshape(x0.shape)).argmax(1))
        it += 1
    return float((1 + overshoot) * r.norm()) if k_i != label else float("inf")


def run_published(model, x, family, n_images):
    """All subspaces of the first n_images, one image and one subspace at a time."""
    margins = torch.empty(n_images, family.n_members)
    with model_guard(model):
        for j in range(family.n_members):
            basis = dense_basis(family, j).to(x.device)
            for i in range(n_images):
                margins[i, j] = published_subspace_deepfool(model, x[i:i + 1], basis)
    return margins


def _timed(fn):
    """fn() -> (out, wall seconds, process CPU seconds). On a loaded machine wall time also counts
    waiting for a core; at 1 thread the CPU time is the work done, so ratios of CPU times are the
    load-independent comparison (wall and CPU figures are both reported)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(n_ours=N_OURS, n_published=N_PUBLISHED, batch_size=512, threads=(1, 2),
            arch="lenet", dataset="fashion-mnist", K=8, refine=True, device="cpu"):
    """Throughput of both methods at each thread count; the speed-up compares the best of each
    (the per-image method is made of tiny ops that often run faster on one thread). On a GPU
    (device='cuda') both run there and only the wall-time figures mean anything."""
    model = models.reference_model(arch, dataset, progress=False).to(device)
    ds = data.load_dataset(dataset, split="test", limit=n_ours, seed=0)
    x = ds.x.to(device)
    family = DCTDiagonal(tuple(x.shape[1:]), K=K, T=1)
    margin_scan(model, x[:4], family, batch_size=batch_size, progress=False)  # warm-up
    before = torch.get_num_threads()
    rows = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            ours, t_ours, c_ours = _timed(lambda: margin_scan(model, x, family, batch_size=batch_size,
                                                              deepfool_kwargs={"refine": refine},
                                                              progress=False))
            pub, t_pub, c_pub = _timed(lambda: run_published(model, x, family, n_published))
            rows[t] = (ours.margins.numel() / t_ours, pub.numel() / t_pub,
                       ours.margins.numel() / c_ours, pub.numel() / c_pub)
    finally:
        torch.set_num_threads(before)
    sub = ours.margins[:n_published].float()
    ok = torch.isfinite(sub) & torch.isfinite(pub)
    best_ours, best_pub = max(r[0] for r in rows.values()), max(r[1] for r in rows.values())
    cpu1 = rows.get(1)
    return {
        "case": f"{arch} {dataset} {family.spec} on {device}" + ("" if refine else " (ours unrefined, like the published method)"),
        "backend": ops.backend()["ops"],
        "pairs_ours": ours.margins.numel(), "pairs_published": pub.numel(),
        "by_threads": {t: {"ours": r[0], "published": r[1], "ours_cpu": r[2], "published_cpu": r[3]}
                       for t, r in rows.items()},
        "pairs_per_s_ours": best_ours, "pairs_per_s_published": best_pub,
        "speedup": best_ours / best_pub,
        # pairs per CPU second at 1 thread: the load-independent ratio (None without a 1-thread run)
        "speedup_cpu_1thread": None if cpu1 is None else cpu1[2] / cpu1[3],
        "median_margin_ratio_published_over_ours": float((pub[ok] / sub[ok]).median()),
    }


def _format(r) -> str:
    lines = [f"{r['case']}, ops backend {r['backend']}; {r['pairs_ours']} pairs (ours), {r['pairs_published']} pairs (published)",
             f"{'threads':>7} {'ours pairs/s':>13} {'published pairs/s':>18} {'ratio':>7}"
             f" {'ours pairs/CPU-s':>17} {'published pairs/CPU-s':>22} {'CPU ratio':>9}"]
    for t, v in r["by_threads"].items():
        lines.append(f"{t:>7} {v['ours']:13.2f} {v['published']:18.2f} {v['ours'] / v['published']:7.1f}"
                     f" {v['ours_cpu']:17.2f} {v['published_cpu']:22.2f} {v['ours_cpu'] / v['published_cpu']:9.1f}")
    lines.append(f"best vs best: {r['pairs_per_s_ours']:.2f} / {r['pairs_per_s_published']:.2f} pairs/s = "
                 f"{r['speedup']:.1f}x (bar {BAR:.0f}x); median margin published/ours on shared pairs "
                 f"{r['median_margin_ratio_published_over_ours']:.3f}")
    return "\n".join(lines)


@pytest.mark.slow
def test_scan_throughput_vs_published(benchmark):
    benchmark.group = "margin scan throughput (pairs/s), LeNet Fashion-MNIST dct:K=8,T=1"
    result = {}
    benchmark.pedantic(lambda: result.update(measure()), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    benchmark.extra_info["meets_bar"] = result["speedup"] >= BAR
    print("\n" + _format(result))
    if result["speedup"] < BAR:  # recorded, not hidden: see benchmarks/README.md
        warnings.warn(f"margin-scan speed-up {result['speedup']:.1f}x is below the {BAR:.0f}x bar", stacklevel=1)
    # the same pairs give the same margins (ours refined, theirs with overshoot: a few % apart)
    assert 0.9 < result["median_margin_ratio_published_over_ours"] < 1.2


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=N_OURS)
    parser.add_argument("--n-published", type=int, default=N_PUBLISHED)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--arch", default="lenet")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--K", type=int, default=8, help="DCT block size (stride 1)")
    parser.add_argument("--no-refine", action="store_true",
                        help="run our scan unrefined, like the published method (like-for-like passes)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (model, images and both methods)")
    a = parser.parse_args()
    print(_format(measure(a.n, a.n_published, a.batch_size, tuple(a.threads), a.arch, a.dataset, a.K,
                          refine=not a.no_refine, device=a.device)))
