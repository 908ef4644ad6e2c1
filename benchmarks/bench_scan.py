"""Margin-scan throughput: pyboundary.margin_scan vs the published per-image, per-subspace method.

Published method (as in the reference code of margin-in-subspace studies): for each subspace a
dense basis matrix B (D x C*K^2) is built; for each image, plain DeepFool runs alone with the
basis: per iteration one forward pass, one reverse pass per candidate class over the retained
graph, the gradient differences projected as B^T g, the closest linearised boundary chosen in
coefficients, and x = x0 + (1 + overshoot) B r. Same model, candidates (10), overshoot (0.02),
max_iter (50) as ours; ours additionally refines the boundary distance (extra forward passes).

Run (from the repo root):
    .venv/bin/python -m pytest benchmarks/bench_scan.py -o python_files='bench_*.py' -s \
        --benchmark-group-by=group --benchmark-columns=min,median,rounds
or as a script (prints the table):  .venv/bin/python benchmarks/bench_scan.py [--n 60] [--n-published 4]

Model: the reference LeNet trained on Fashion-MNIST (``models.reference_model('lenet',
'fashion-mnist')``, cached), 28x28 test images, ``dct:K=8,T=1`` (21 subspaces). The published
method runs on a subset of the same (sample, subspace) pairs (every subspace of the first
``n_published`` images), as it is too slow for all; throughput is pairs per second.
"""

from __future__ import annotations

import time

import pytest
import torch

from pyboundary import data, models, ops
from pyboundary.margins import margin_scan
from pyboundary.subspaces import DCTDiagonal
from pyboundary.utils import model_guard

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


def published_subspace_deepfool(model, x0, basis, num_classes=10, overshoot=0.02, max_iter=50):
    """Plain DeepFool of one image (1, C, H, W) restricted to span(basis); returns the L2 margin."""
    with torch.no_grad():
        f0 = model(x0)[0]
    order = f0.argsort(descending=True)[:num_classes]
    label = int(order[0])
    r_tot = torch.zeros(basis.shape[1])
    x = x0.clone().requires_grad_(True)
    k_i, it = label, 0
    while k_i == label and it < max_iter:
        fs = model(x)[0]
        grad_orig = torch.autograd.grad(fs[order[0]], x, retain_graph=True)[0].reshape(-1)
        pert, w = float("inf"), None
        for k in range(1, len(order)):
            cur = torch.autograd.grad(fs[order[k]], x, retain_graph=True)[0].reshape(-1)
            w_k = basis.T @ (cur - grad_orig)
            f_k = (fs[order[k]] - fs[order[0]]).detach()
            pert_k = float(f_k.abs() / w_k.norm())
            if pert_k < pert:
                pert, w = pert_k, w_k
        r_tot = r_tot + (pert + 1e-4) * w / w.norm()
        x = (x0 + (1 + overshoot) * (basis @ r_tot).reshape(x0.shape)).requires_grad_(True)
        with torch.no_grad():
            k_i = int(model(x).argmax(1))
        it += 1
    return float((1 + overshoot) * r_tot.norm()) if k_i != label else float("inf")


def run_published(model, x, family, n_images):
    """All subspaces of the first n_images, one image and one subspace at a time."""
    margins = torch.empty(n_images, family.n_members)
    with model_guard(model):
        for j in range(family.n_members):
            basis = dense_basis(family, j)
            for i in range(n_images):
                margins[i, j] = published_subspace_deepfool(model, x[i:i + 1], basis)
    return margins


def measure(n_ours=N_OURS, n_published=N_PUBLISHED, batch_size=512):
    model = models.reference_model("lenet", "fashion-mnist", progress=False)
    ds = data.load_dataset("fashion-mnist", split="test", limit=n_ours, seed=0)
    family = DCTDiagonal(tuple(ds.x.shape[1:]), K=8, T=1)
    margin_scan(model, ds.x[:4], family, batch_size=batch_size, progress=False)  # warm-up
    t0 = time.perf_counter()
    ours = margin_scan(model, ds.x, family, batch_size=batch_size, progress=False)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    pub = run_published(model, ds.x, family, n_published)
    t_pub = time.perf_counter() - t0
    pairs_ours, pairs_pub = ours.margins.numel(), pub.numel()
    sub = ours.margins[:n_published].float()
    ok = torch.isfinite(sub) & torch.isfinite(pub)
    return {
        "backend": ops.backend()["ops"],
        "threads": torch.get_num_threads(),
        "pairs_ours": pairs_ours, "seconds_ours": t_ours, "pairs_per_s_ours": pairs_ours / t_ours,
        "pairs_published": pairs_pub, "seconds_published": t_pub, "pairs_per_s_published": pairs_pub / t_pub,
        "speedup": (pairs_ours / t_ours) / (pairs_pub / t_pub),
        "median_margin_ratio_published_over_ours": float((pub[ok] / sub[ok]).median()),
    }


def _format(r) -> str:
    return (
        f"ops backend {r['backend']}, {r['threads']} threads\n"
        f"pyboundary margin_scan : {r['pairs_ours']:5d} pairs in {r['seconds_ours']:7.1f} s = "
        f"{r['pairs_per_s_ours']:8.2f} pairs/s\n"
        f"published method       : {r['pairs_published']:5d} pairs in {r['seconds_published']:7.1f} s = "
        f"{r['pairs_per_s_published']:8.2f} pairs/s\n"
        f"speed-up {r['speedup']:.1f}x (bar {BAR:.0f}x); median margin published/ours on shared pairs "
        f"{r['median_margin_ratio_published_over_ours']:.3f}"
    )


@pytest.mark.slow
def test_scan_throughput_vs_published(benchmark):
    benchmark.group = "margin scan throughput (pairs/s), LeNet Fashion-MNIST dct:K=8,T=1"
    result = {}
    benchmark.pedantic(lambda: result.update(measure()), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print("\n" + _format(result))
    assert result["speedup"] >= BAR, _format(result)
    # the same pairs give the same margins (ours refined, theirs with overshoot: a few % apart)
    assert 0.9 < result["median_margin_ratio_published_over_ours"] < 1.2


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=N_OURS)
    parser.add_argument("--n-published", type=int, default=N_PUBLISHED)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    print(_format(measure(a.n, a.n_published, a.batch_size)))
