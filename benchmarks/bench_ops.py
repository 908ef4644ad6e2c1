"""Compiled ops vs their pure-torch twins, and DCT-block projection vs a dense basis matrix.

Run (from the repo root; `make bench` runs all benchmark files):
    .venv/bin/python -m pytest benchmarks/bench_ops.py -o python_files='bench_*.py' \
        --benchmark-group-by=group --benchmark-columns=min,median,rounds

Each pytest-benchmark group holds the contenders of one comparison, so ratios are read within
one run. float32, batch 64, on --device (default cpu; `--device cuda` times with a
synchronisation after each call), threads = PYBOUNDARY_BENCH_THREADS (default 2).
The dense basis for 224x224x3, K=16 is 150528 x 768 float32 (462 MB): built once per session.
"""

from __future__ import annotations

import pytest
import torch

from pyboundary import ops
from pyboundary.ops import reference

COMPILED = ops.backend()["ops"] == "compiled"
pytestmark = pytest.mark.skipif(not COMPILED, reason="compiled ops not loaded")

BATCH = 64
SIZES = [(1, 28, 28), (3, 32, 32), (3, 224, 224)]
BLOCKS = [8, 16]


def _ids(shape):
    c, h, w = shape
    return f"{h}x{w}x{c}"


def _rounds(numel):
    """Fewer rounds for the big cases: the session must stay within a few minutes."""
    return 5 if numel > 2_000_000 else 30


def _run(benchmark, fn, *args, numel):
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        inner = fn

        def fn(*a):  # CUDA work is asynchronous: time it to completion
            out = inner(*a)
            torch.cuda.synchronize()
            return out

    fn(*args)  # warm caches (DCT matrices) outside the timing
    benchmark.pedantic(fn, args=args, rounds=_rounds(numel), iterations=1, warmup_rounds=1)


def _images(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((BATCH, *shape), generator=g).to(device)


# ---- dct2 / idct2 ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["compiled", "twin"])
@pytest.mark.parametrize("op", ["dct2", "idct2"])
@pytest.mark.parametrize("shape", SIZES, ids=_ids)
def test_dct2(benchmark, bench_device, op, impl, shape):
    benchmark.group = f"{op} {_ids(shape)} b{BATCH}"
    fn = getattr(torch.ops.pyboundary, op) if impl == "compiled" else getattr(reference, op)
    x = _images(shape, device=bench_device)
    _run(benchmark, fn, x, numel=x.numel())


# ---- block analysis / synthesis -------------------------------------------------------------


def _origins(shape, k, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h, w = shape[1], shape[2]
    return (torch.randint(0, h - k + 1, (BATCH,), generator=g).to(device),
            torch.randint(0, w - k + 1, (BATCH,), generator=g).to(device))


@pytest.mark.parametrize("impl", ["compiled", "twin"])
@pytest.mark.parametrize("op", ["dct_block_analysis", "dct_block_synthesis"])
@pytest.mark.parametrize("k", BLOCKS)
@pytest.mark.parametrize("shape", SIZES, ids=_ids)
def test_block_op(benchmark, bench_device, op, impl, k, shape):
    """Per-sample origins (each sample its own block)."""
    benchmark.group = f"{op} {_ids(shape)} K{k} b{BATCH}"
    fn = getattr(torch.ops.pyboundary, op) if impl == "compiled" else getattr(reference, op)
    row0, col0 = _origins(shape, k, device=bench_device)
    if op == "dct_block_analysis":
        x = _images(shape, device=bench_device)
        _run(benchmark, fn, x, row0, col0, k, k, numel=x.numel())
    else:
        coeffs = _images((shape[0], k, k), device=bench_device)
        _run(benchmark, fn, coeffs, row0, col0, shape[1], shape[2], numel=BATCH * shape[0] * shape[1] * shape[2])


# ---- projection onto one block: separable ops vs a dense basis matrix -----------------------

_BASES: dict = {}


def _block_origin(shape, k):
    """The block projected onto: frequencies [o, o + k) in both directions, o = min(k, H - k)."""
    return min(k, shape[1] - k, shape[2] - k)


def _dense_basis(shape, k):
    """(C*H*W, C*K^2) float32 basis of the block at _block_origin of every channel, the way
    published code projects (built with the synthesis op applied to unit coefficients)."""
    key = (shape, k)
    if key not in _BASES:
        _BASES.clear()  # keep at most one big basis alive
        c, h, w = shape
        m = c * k * k
        eye = torch.eye(m).view(m, c, k, k)
        org = torch.full((m,), _block_origin(shape, k), dtype=torch.int64)
        _BASES[key] = ops.dct_block_synthesis(eye, org, org, h, w).reshape(m, c * h * w).T.contiguous()
    return _BASES[key]


def _project_ops(analysis, synthesis):
    def project(x, row0, col0, k):
        return synthesis(analysis(x, row0, col0, k, k), row0, col0, x.shape[2], x.shape[3])

    return project


def _project_dense(x, basis):
    flat = x.reshape(x.shape[0], -1)
    return ((flat @ basis) @ basis.T).view_as(x)


@pytest.mark.parametrize("impl", ["compiled", "twin", "dense-basis"])
@pytest.mark.parametrize("k", BLOCKS)
@pytest.mark.parametrize("shape", SIZES, ids=_ids)
def test_block_projection(benchmark, bench_device, impl, k, shape):
    benchmark.group = f"projection {_ids(shape)} K{k} b{BATCH}"
    x = _images(shape, device=bench_device)
    org = torch.full((BATCH,), _block_origin(shape, k), dtype=torch.int64, device=bench_device)
    if impl == "dense-basis":
        basis = _dense_basis(shape, k).to(bench_device)
        want = _project_ops(torch.ops.pyboundary.dct_block_analysis, torch.ops.pyboundary.dct_block_synthesis)(x, org, org, k)
        assert torch.allclose(_project_dense(x, basis), want, atol=1e-4)
        _run(benchmark, _project_dense, x, basis, numel=x.numel())
    else:
        src = torch.ops.pyboundary if impl == "compiled" else reference
        project = _project_ops(src.dct_block_analysis, src.dct_block_synthesis)
        _run(benchmark, project, x, org, org, k, numel=x.numel())


# ---- deepfool_select ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["compiled", "twin"])
@pytest.mark.parametrize("p", [2.0, float("inf")], ids=["p2", "pinf"])
@pytest.mark.parametrize("k,m", [(10, 3 * 32 * 32), (9, 3 * 16 * 16), (10, 28 * 28)])
def test_deepfool_select(benchmark, bench_device, impl, p, k, m):
    benchmark.group = f"deepfool_select k{k} M{m} {'p2' if p == 2 else 'pinf'} b{BATCH}"
    g = torch.Generator().manual_seed(3)
    gap = (-torch.rand(BATCH, k, generator=g)).to(bench_device)
    grad = torch.randn(BATCH, k, m, generator=g).to(bench_device)
    fn = torch.ops.pyboundary.deepfool_select if impl == "compiled" else reference.deepfool_select
    _run(benchmark, fn, gap, grad, p, 1e-4, numel=grad.numel())
