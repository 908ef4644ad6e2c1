"""Tests of the compiled ops (torch.ops.pyboundary.*), their twins and the ops front end.

Ground truths: scipy.fft.dctn/idctn (type 2, norm='ortho'), dense float64 DCT bases built from
the definition, float64 hand computations of the DeepFool choice. The compiled kernels are also
compared with the twins of pyboundary.ops.reference; those comparisons require the compiled library
(they fail when it did not load, unless PYBOUNDARY_FORCE_REFERENCE deliberately disabled it).

Devices: device-parametrised tests run on "cpu", on "cuda_emu" (the real CUDA kernels executed
on the host by tests/cuda_emu, under AddressSanitizer; `make cuda-emu`; skipped elsewhere) and
on "cuda" (a GPU), with the same assertions and tolerances.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.fft
import torch

from cuda_emu import shim as cuda_emu
from pyboundary import ops
from pyboundary.ops import reference

COMPILED = ops.backend()["ops"] == "compiled"
FORCED_REFERENCE = os.environ.get("PYBOUNDARY_FORCE_REFERENCE", "").strip().lower() in ("1", "true", "yes", "on")
# The real op namespace, captured before any test routes torch.ops.pyboundary to the emulator:
# its CPU kernels are the reference the GPU devices are compared with.
CPU_OPS = torch.ops.pyboundary
GPU_DEVICES = [pytest.param("cuda_emu", marks=pytest.mark.cuda_emu), pytest.param("cuda", marks=pytest.mark.cuda)]
DEVICES = ["cpu", *GPU_DEVICES]
INF = math.inf


@pytest.fixture
def compiled():
    """The compiled library must be loaded: in this project's CI it always is."""
    if COMPILED:
        return
    if FORCED_REFERENCE:
        pytest.skip("compiled ops disabled on purpose (PYBOUNDARY_FORCE_REFERENCE)")
    pytest.fail(f"the compiled ops library did not load: {ops.backend()['reason']}")


@pytest.fixture
def device(request):
    """Torch device of a device-parametrised test (indirect); 'cuda_emu' runs the test on CPU
    tensors with torch.ops.pyboundary routed to the emulated CUDA kernels."""
    if request.param == "cuda_emu":
        with cuda_emu.emulated():
            yield "cpu"
    else:
        if request.param == "cpu" and not COMPILED and not FORCED_REFERENCE:
            pytest.fail(f"the compiled ops library did not load: {ops.backend()['reason']}")
        yield request.param


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype=torch.float64, seed=0, device="cpu"):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype).to(device)


def _rel(a, b):
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _dct_def(n):
    """C_n from the definition, float64 numpy (independent of the library)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    a = np.where(k == 0, np.sqrt(1.0 / n), np.sqrt(2.0 / n))
    return a * np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def _block_basis(H, W, r0, c0, kh, kw):
    """Dense (H*W, kh*kw) float64 basis of the DCT block, columns ordered like coeffs (u, v)."""
    ch, cw = _dct_def(H), _dct_def(W)
    cols = [np.outer(ch[r0 + u], cw[c0 + v]).ravel() for u in range(kh) for v in range(kw)]
    return np.stack(cols, axis=1)


def _origins(*vals, device="cpu"):
    return torch.tensor(vals, dtype=torch.int64, device=device)


# ---- backend ------------------------------------------------------------------------------


def test_backend_reports_keys():
    b = ops.backend()
    assert set(b) >= {"ops", "cuda_kernels", "library", "reason"}
    assert b["ops"] in ("compiled", "reference")
    assert isinstance(b["cuda_kernels"], bool)
    if b["ops"] == "compiled":
        assert b["library"] and os.path.exists(b["library"]) and b["reason"] is None
        assert hasattr(torch.ops.pyboundary, "dct_block_analysis")
    else:
        assert b["library"] is None and b["reason"]


def _run_python(code, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "PYBOUNDARY_FORCE_REFERENCE"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
        cwd=cwd, timeout=120,
    )


def test_force_reference_env():
    code = "from pyboundary import ops; b = ops.backend(); print(b['ops'], b['library'])"
    out = _run_python(code, {"PYBOUNDARY_FORCE_REFERENCE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "None"]
    assert "RuntimeWarning" not in out.stderr  # forcing is deliberate: no warning


def test_missing_library_falls_back_with_one_warning(tmp_path):
    """A wheel-like install without the compiled library: a copy of the whole package, imported
    with site processing off (-S: no editable-install finder or .pth file), the dependencies'
    site-packages on PYTHONPATH. Every module of the package imports, from the copy."""
    src = os.path.dirname(os.path.dirname(ops.__file__))
    shutil.copytree(src, tmp_path / "pyboundary", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    deps = sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (torch, np, scipy)})
    code = (
        "import sys, warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pyboundary\n"
        "    from pyboundary import ops\n"
        "    x = torch.rand(2, 5, 6, dtype=torch.float64)\n"
        "    y = ops.idct2(ops.dct2(x)); ops.dct2(x)\n"
        "assert ops.backend()['ops'] == 'reference', ops.backend()\n"
        "assert torch.allclose(y, x, atol=1e-12)\n"
        "msgs = [str(m.message) for m in w if 'compiled ops unavailable' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "import importlib, pkgutil\n"
        "for info in pkgutil.walk_packages(pyboundary.__path__, 'pyboundary.'):\n"
        "    try:\n"
        "        importlib.import_module(info.name)\n"
        "    except ImportError as e:  # only an optional integration may miss its third-party package\n"
        "        if not (info.name.startswith('pyboundary.adapters.') and ' needs ' in str(e)):\n"
        "            raise\n"
        "mods = [m for n, m in sys.modules.items() if n.split('.')[0] == 'pyboundary']\n"
        "outside = [m.__name__ for m in mods if not m.__file__.startswith(sys.argv[1])]\n"
        "assert len(mods) > 20 and not outside, (len(mods), outside)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYBOUNDARY_FORCE_REFERENCE", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *deps])
    out = subprocess.run([sys.executable, "-S", "-W", "always", "-c", code, str(tmp_path)], capture_output=True,
                         text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok"


def test_loader_takes_the_library_built_for_this_interpreter(tmp_path):
    """A stale build for another Python next to the right one never wins (nor alone)."""
    from pyboundary.ops import _library

    stale = tmp_path / "_C.cpython-30-x86_64-linux-gnu.so"  # sorts before any real suffix
    stale.write_bytes(b"")
    assert _library.find_library(str(tmp_path)) is None
    right = tmp_path / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
    right.write_bytes(b"")
    assert _library.find_library(str(tmp_path)) == str(right)
    if COMPILED:
        assert ops.backend()["library"].endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


@pytest.mark.usefixtures("compiled")
def test_compiled_constants_are_the_python_constants():
    """The push constants exist once in C++ (pyboundary_math.h) and once in Python
    (pyboundary.ops); the library exposes its values, the schema default must agree."""
    eps, abs_push = torch.ops.pyboundary._select_constants()
    assert (eps, abs_push) == (ops.DEFAULT_SELECT_EPS, ops.SELECT_ABS_PUSH)
    schema = torch.ops.pyboundary.deepfool_select.default._schema
    assert {a.name: a.default_value for a in schema.arguments}["eps"] == eps
    for fn in (ops.deepfool_select, reference.deepfool_select):
        assert inspect.signature(fn).parameters["eps"].default == eps


# ---- dct2 / idct2 -------------------------------------------------------------------------

# (2, 65, 97) and (64, 66): the CPU kernel's butterfly path (>= 64) with odd and even sizes.
DCT_SHAPES = [(28, 28), (32, 32), (224, 224), (7, 13), (3, 7, 13), (2, 3, 28, 28), (2, 2, 1, 5, 9),
              (2, 65, 97), (64, 66)]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("shape", DCT_SHAPES, ids=lambda s: "x".join(map(str, s)))
# tolerances: ~5x (float32) and ~10x (float64) the largest error measured on cpu and cuda_emu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_dct2_matches_scipy(shape, dtype, tol, device):
    x = _rand(*shape, dtype=dtype, seed=1, device=device)
    xn = x.double().cpu().numpy()
    want = scipy.fft.dctn(xn, type=2, norm="ortho", axes=(-2, -1))
    got = ops.dct2(x)
    assert got.dtype == dtype and got.shape == x.shape and got.device == x.device
    assert _rel(got, want) < tol
    want_inv = scipy.fft.idctn(xn, type=2, norm="ortho", axes=(-2, -1))
    got_inv = ops.idct2(x)
    assert got_inv.dtype == dtype and got_inv.shape == x.shape
    assert _rel(got_inv, want_inv) < tol


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("hw", [(17, 23), (67, 64)])
def test_dct2_round_trip_and_parseval(device, hw):
    x = _rand(3, 2, *hw, seed=2, device=device)
    y = ops.dct2(x)
    assert torch.allclose(ops.idct2(y), x, rtol=0, atol=3e-14)
    assert torch.allclose(ops.dct2(ops.idct2(x)), x, rtol=0, atol=3e-14)
    # Parseval per image: the transform is orthonormal.
    assert torch.allclose(y.square().sum((-2, -1)), x.square().sum((-2, -1)), rtol=4e-15, atol=0)
    # frequency (0, 0) is the mean times sqrt(H W)
    assert torch.allclose(y[..., 0, 0], x.mean((-2, -1)) * math.sqrt(hw[0] * hw[1]), rtol=1e-13, atol=0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_dct2_noncontiguous(device):
    base = _rand(2, 13, 3, 11, seed=3, device=device)
    x = base.permute(0, 2, 3, 1)[..., ::2]  # (2, 3, 11, 7), non-contiguous
    assert not x.is_contiguous()
    want = scipy.fft.dctn(x.cpu().numpy(), type=2, norm="ortho", axes=(-2, -1))
    assert _rel(ops.dct2(x), want) < 1e-14
    assert _rel(ops.idct2(ops.dct2(x)), x) < 1e-14


# ---- block ops -----------------------------------------------------------------------------

BLOCK_CASES = [
    # (C, H, W, kh, kw, row0 per sample, col0 per sample)
    (1, 8, 8, 3, 3, (0, 5, 2), (0, 5, 1)),  # (5, 5): block touching the bottom-right edge
    (3, 7, 13, 2, 5, (5, 0), (8, 3)),  # non-square, edge in both directions
    (2, 12, 10, 12, 10, (0,), (0,)),  # the whole space
    (1, 6, 9, 1, 1, (5, 0, 3, 2), (8, 0, 4, 1)),  # single coefficients
]


def _case(case, dtype=torch.float64, device="cpu", seed=0):
    C, H, W, kh, kw, r, c = case
    n = len(r)
    x = _rand(n, C, H, W, dtype=dtype, seed=seed, device=device)
    return x, _origins(*r, device=device), _origins(*c, device=device), kh, kw


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=range(len(BLOCK_CASES)))
def test_block_ops_match_dense_basis(case, device):
    x, row0, col0, kh, kw = _case(case, device=device)
    n, C, H, W = x.shape
    coeffs = ops.dct_block_analysis(x, row0, col0, kh, kw)
    assert coeffs.shape == (n, C, kh, kw) and coeffs.dtype == x.dtype
    proj = ops.dct_block_synthesis(coeffs, row0, col0, H, W)
    assert proj.shape == x.shape
    for i in range(n):  # test oracle, not a hot path
        basis = _block_basis(H, W, int(row0[i]), int(col0[i]), kh, kw)
        xi = x[i].reshape(C, H * W).cpu().numpy()
        want_c = (xi @ basis).reshape(C, kh, kw)
        np.testing.assert_allclose(coeffs[i].cpu().numpy(), want_c, rtol=0, atol=1e-13)
        want_p = (xi @ basis @ basis.T).reshape(C, H, W)
        np.testing.assert_allclose(proj[i].cpu().numpy(), want_p, rtol=0, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_block_ops_float32_close_to_float64(device):
    x, row0, col0, kh, kw = _case((3, 32, 32, 8, 8, (0, 24, 9), (24, 0, 17)), device=device)
    c64 = ops.dct_block_analysis(x, row0, col0, kh, kw)
    c32 = ops.dct_block_analysis(x.float(), row0, col0, kh, kw)
    assert c32.dtype == torch.float32 and _rel(c32, c64) < 1e-6
    s64 = ops.dct_block_synthesis(c64, row0, col0, 32, 32)
    s32 = ops.dct_block_synthesis(c64.float(), row0, col0, 32, 32)
    assert s32.dtype == torch.float32 and _rel(s32, s64) < 1e-6


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_block_analysis_is_the_dct2_window(device):
    x, row0, col0, kh, kw = _case((2, 20, 15, 6, 4, (14, 3), (11, 0)), device=device)
    full = ops.dct2(x)
    got = ops.dct_block_analysis(x, row0, col0, kh, kw)
    for i in range(x.shape[0]):
        r, c = int(row0[i]), int(col0[i])
        assert torch.allclose(got[i], full[i, :, r : r + kh, c : c + kw], rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("case", BLOCK_CASES[:2], ids=range(2))
def test_block_adjoint_idempotent_norm(case, device):
    x, row0, col0, kh, kw = _case(case, device=device)
    n, C, H, W = x.shape
    y = _rand(n, C, kh, kw, seed=7, device=device)
    ax = ops.dct_block_analysis(x, row0, col0, kh, kw)
    asy = ops.dct_block_synthesis(y, row0, col0, H, W)
    # <A x, y> = <x, A* y> per sample
    lhs = (ax * y).sum((1, 2, 3))
    rhs = (x * asy).sum((1, 2, 3))
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-14)
    proj = ops.dct_block_synthesis(ax, row0, col0, H, W)
    proj2 = ops.dct_block_synthesis(ops.dct_block_analysis(proj, row0, col0, kh, kw), row0, col0, H, W)
    assert torch.allclose(proj2, proj, rtol=0, atol=1e-14)
    # projected norm = coefficient norm (orthonormal rows); the residual is orthogonal
    assert torch.allclose(proj.flatten(1).norm(dim=1), ax.flatten(1).norm(dim=1), rtol=2e-15, atol=0)
    assert ((x - proj) * proj).sum((1, 2, 3)).abs().max() < 1e-13
    # synthesis then analysis is the identity on coefficients
    assert torch.allclose(ops.dct_block_analysis(asy, row0, col0, kh, kw), y, rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_block_ops_noncontiguous(device):
    x, row0, col0, kh, kw = _case((3, 9, 10, 3, 4, (6, 0), (6, 2)), device=device)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    assert not xt.is_contiguous()
    r_big = torch.stack([row0, row0], 1)[:, 0]  # non-contiguous origins
    assert not r_big.is_contiguous()
    want = ops.dct_block_analysis(x, row0, col0, kh, kw)
    got = ops.dct_block_analysis(xt, r_big, col0, kh, kw)
    assert torch.equal(got, want)  # the kernels read a contiguous copy: the same numbers
    ct = want.transpose(0, 1).contiguous().transpose(0, 1)
    assert not ct.is_contiguous()
    assert torch.allclose(
        ops.dct_block_synthesis(ct, r_big, col0, 9, 10),
        ops.dct_block_synthesis(want, row0, col0, 9, 10),
        rtol=0, atol=1e-13,
    )


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_many_sizes_survive_matrix_cache_eviction(device):
    """More distinct DCT sizes than the kernels' matrix cache holds: every result stays right."""
    for n in range(3, 45):
        x = _rand(2, 1, n, n + 2, seed=n, dtype=torch.float32, device=device)
        assert _rel(ops.dct2(x), reference.dct2(x)) < 2e-6
        assert _rel(ops.idct2(x), reference.idct2(x)) < 2e-6
        r, c = _origins(0, n - 2, device=device), _origins(n, 1, device=device)
        assert _rel(ops.dct_block_analysis(x, r, c, 2, 2), reference.dct_block_analysis(x, r, c, 2, 2)) < 2e-6


# Inputs above every at::parallel_for grain of the CPU kernels (csrc/cpu: block_grain = 2^20 /
# multiply-adds per item, select: 2^18 / (k M) samples), so 2 and 3 threads split each op into 2
# and 3 chunks: dct2 30x20 (plain form) 34 images per chunk, 120 images; dct2 64x72 (butterfly)
# 3 per chunk, 8 images; block ops kh=7 on 30x20: 249 (sample, channel) items per chunk, 750;
# select k=4, M=300: 218 samples per chunk, 700.
def _thread_invariance_runs():
    x = _rand(40, 3, 30, 20, dtype=torch.float32, seed=60)
    xb = _rand(8, 64, 72, dtype=torch.float32, seed=62)
    xa = _rand(250, 3, 30, 20, dtype=torch.float32, seed=63)
    g = torch.Generator().manual_seed(64)
    row0, col0 = torch.randint(0, 24, (250,), generator=g), torch.randint(0, 12, (250,), generator=g)
    gap, grad = _select_inputs(n=700, k=4, m=300, seed=61, dtype=torch.float32)

    def run():
        c = ops.dct_block_analysis(xa, row0, col0, 7, 9)
        return [ops.dct2(x), ops.idct2(x), ops.dct2(xb), ops.idct2(xb), c,
                ops.dct_block_synthesis(c, row0, col0, 30, 20), *ops.deepfool_select(gap, grad, 2),
                *ops.deepfool_select(gap, grad, INF)]

    return run


@pytest.mark.usefixtures("compiled")
def test_cpu_kernels_thread_count_invariant():
    """Parallel chunks (at::parallel_for) give bitwise the results of one thread."""
    run = _thread_invariance_runs()
    old = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            results[n] = run()
    finally:
        torch.set_num_threads(old)
    for n in (2, 3):
        for i, (a, b) in enumerate(zip(results[1], results[n])):
            assert torch.equal(a, b), (n, i)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_block_ops_empty_batch(device):
    x = torch.zeros(0, 3, 8, 8, device=device)
    e = torch.zeros(0, dtype=torch.int64, device=device)
    assert ops.dct_block_analysis(x, e, e, 2, 2).shape == (0, 3, 2, 2)
    assert ops.dct_block_synthesis(torch.zeros(0, 3, 2, 2, device=device), e, e, 8, 8).shape == (0, 3, 8, 8)


EMPTY_SHAPES = [(0, 5), (5, 0), (0, 0), (3, 0, 4), (2, 4, 0), (0, 4, 5), (2, 0, 3, 3)]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dct2_empty_input_gives_empty_output(shape, device):
    """H = 0, W = 0 or an empty batch: an empty result of the same shape (as torch ops do), on
    every backend: compiled CPU, CUDA (emulated or real) and the twin."""
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(shape, dtype=dtype, device=device)
        for op in ("dct2", "idct2"):
            for impl in (ops, reference):
                y = getattr(impl, op)(x)
                assert y.shape == x.shape and y.dtype == dtype and y.device == x.device, (impl, op)


# ---- deepfool_select -----------------------------------------------------------------------


def _select_by_hand(gap, grad, p, eps):
    """float64 loop oracle of the DeepFool choice (independent of both implementations)."""
    gap, grad = gap.double().cpu().numpy(), grad.double().cpu().numpy()
    n, k, m = grad.shape
    steps, idx, dists = np.zeros((n, m)), np.zeros(n, dtype=np.int64), np.zeros(n)
    for i in range(n):
        best, best_d = 0, None
        for c in range(k):
            g = grad[i, c]
            norm = np.sqrt((g * g).sum()) if p == 2 else np.abs(g).sum()
            d = np.inf if norm == 0 else abs(gap[i, c]) / norm
            if best_d is None or d < best_d:
                best, best_d = c, d
        g = grad[i, best]
        push = (1 + eps) * abs(gap[i, best]) + 1e-3 * eps
        if p == 2:
            denom, direction = (g * g).sum(), g
        else:
            denom, direction = np.abs(g).sum(), np.sign(g)
        steps[i] = 0 if denom == 0 else push / denom * direction
        idx[i], dists[i] = best, best_d
    return steps, idx, dists


def _select_inputs(n=6, k=4, m=11, seed=0, dtype=torch.float64, device="cpu"):
    gap = -_rand(n, k, seed=seed, dtype=dtype, device=device).abs()
    grad = _rand(n, k, m, seed=seed + 1, dtype=dtype, device=device)
    return gap, grad


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("p", [2, INF])
@pytest.mark.parametrize("k", [1, 4])
def test_select_matches_hand_computation(p, k, device):
    gap, grad = _select_inputs(k=k, device=device)
    grad[1, -1] = 0.0  # a zero-norm candidate (the only one when k = 1)
    eps = 1e-3
    step, index, dist = ops.deepfool_select(gap, grad, p, eps)
    want_s, want_i, want_d = _select_by_hand(gap, grad, p, eps)
    assert step.shape == (6, 11) and index.dtype == torch.int64 and dist.shape == (6,)
    np.testing.assert_array_equal(index.cpu().numpy(), want_i)
    np.testing.assert_allclose(dist.cpu().numpy(), want_d, rtol=2e-15)
    np.testing.assert_allclose(step.cpu().numpy(), want_s, rtol=2e-15, atol=0)
    assert torch.isfinite(step).all()
    if k == 4:
        assert index[1] != 3  # the zero-norm candidate is never chosen
    else:
        assert dist[1] == INF and (step[1] == 0).all() and index[1] == 0


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("p", [2, INF])
def test_select_lands_just_past_linearised_boundary(p, device):
    gap, grad = _select_inputs(n=16, k=5, m=30, seed=3, device=device)
    eps = 1e-4
    step, index, dist = ops.deepfool_select(gap, grad, p, eps)
    g = grad[torch.arange(16, device=device), index]
    gap_c = gap.gather(1, index[:, None])[:, 0]
    landed = gap_c + (g * step).sum(1)
    # gap + <g, step> = eps (|gap| + 1e-3): just past the boundary, never before it
    assert torch.allclose(landed, eps * (gap_c.abs() + 1e-3), rtol=5e-11, atol=0)
    assert (landed > 0).all()
    # the step length in the dual norm is the distance, up to the push
    size = step.norm(dim=1) if p == 2 else step.abs().amax(dim=1)
    assert torch.allclose(size, dist * (1 + eps) + 1e-3 * eps / (g.norm(dim=1) if p == 2 else g.abs().sum(1)),
                          rtol=3e-15, atol=0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_select_all_zero_gradients(device):
    gap = -torch.rand(3, 2, dtype=torch.float64, device=device)
    grad = torch.zeros(3, 2, 5, dtype=torch.float64, device=device)
    for p in (2, INF):
        step, index, dist = ops.deepfool_select(gap, grad, p)
        assert (index == 0).all() and torch.isinf(dist).all() and (step == 0).all()


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_select_float32_and_noncontiguous(device):
    gap, grad = _select_inputs(n=5, k=3, m=40, seed=5, dtype=torch.float32, device=device)
    grad_nc = grad.transpose(1, 2).contiguous().transpose(1, 2)
    gap_nc = gap.t().contiguous().t()
    assert not grad_nc.is_contiguous() and not gap_nc.is_contiguous()
    for p in (2, INF):
        step, index, dist = ops.deepfool_select(gap_nc, grad_nc, p)
        assert step.dtype == torch.float32 and dist.dtype == torch.float32
        want_s, want_i, want_d = _select_by_hand(gap, grad, p, 1e-4)
        np.testing.assert_array_equal(index.cpu().numpy(), want_i)
        np.testing.assert_allclose(dist.cpu().numpy(), want_d, rtol=3e-7)
        np.testing.assert_allclose(step.cpu().numpy(), want_s, rtol=4e-7, atol=0)


def _near_tie_inputs(n=24, m=4096, seed=0):
    """float32 (gap, grad) with k = 2 candidates whose distances differ by ~1e-10 relative.

    Both gaps are -1; the second gradient is a permutation of the first with one entry moved
    one float32 ulp away from zero, in the first or the second candidate (alternating), so the
    exact choice is known while a float32 accumulation of the M terms (error ~1e-6 relative,
    order-dependent) decides it by chance.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, m, generator=g, dtype=torch.float32)
    perm = torch.stack([torch.randperm(m, generator=g) for _ in range(n)])
    other = base.gather(1, perm)
    grad = torch.stack([base, other], 1)  # (n, 2, m)
    j = torch.randint(0, m, (n,), generator=g)
    bumped = torch.arange(n) % 2  # the candidate made (slightly) longer: it is the closest
    rows = torch.arange(n)
    v = grad[rows, bumped, j]
    grad[rows, bumped, j] = torch.nextafter(v, torch.where(v >= 0, math.inf, -math.inf))
    gap = torch.full((n, 2), -1.0, dtype=torch.float32)
    return gap, grad, bumped


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("p", [2, INF])
def test_select_float32_near_ties_decided_exactly(p, device):
    """Norms accumulate in double on every device (and in the twin): a float32 near-tie picks
    the exactly closer candidate everywhere, with the same distance."""
    gap, grad, want = _near_tie_inputs()
    # The inputs are real near-ties: a float32 accumulation in index order misorders some.
    terms = grad.square() if p == 2 else grad.abs()
    f32 = terms.cumsum(-1, dtype=torch.float32)[..., -1]  # sequential float32 sums
    f32_pick = (f32[:, 1] > f32[:, 0]).long()  # larger norm = smaller distance
    assert (f32_pick != want).any(), "inputs are not near-ties in float32"
    g64 = grad.double()
    exact = g64.square().sum(-1) if p == 2 else g64.abs().sum(-1)  # squares of float32 are exact
    norm = exact.sqrt() if p == 2 else exact
    want_dist = (1.0 / norm.gather(1, want[:, None])[:, 0]).float()
    for impl in (ops, reference):
        step, index, dist = impl.deepfool_select(gap.to(device), grad.to(device), p)
        assert torch.equal(index.cpu(), want), impl
        assert torch.equal(dist.cpu(), want_dist), impl


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("precision", ["high", "medium"])
def test_dct2_accuracy_independent_of_tf32_settings(precision, device):
    """dct2/idct2 use their own kernels: TF32 / reduced-precision matmul settings change nothing."""
    x = _rand(3, 2, 40, 56, dtype=torch.float32, seed=71, device=device)
    want = scipy.fft.dctn(x.double().cpu().numpy(), type=2, norm="ortho", axes=(-2, -1))
    before = ops.dct2(x)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision(precision)
        got = ops.dct2(x)
        back = ops.idct2(got)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[:2]
        torch.set_float32_matmul_precision(old[2])
    assert torch.equal(got, before)
    assert _rel(got, want) < 1e-6
    assert _rel(back, x) < 1e-6


# ---- compiled kernels vs their twins ---------------------------------------------------------


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_matches_twins(dtype):
    P = torch.ops.pyboundary
    tol = 1e-6 if dtype == torch.float32 else 3e-14
    x = _rand(4, 3, 32, 24, dtype=dtype, seed=11)
    assert _rel(P.dct2(x), reference.dct2(x)) < tol
    assert _rel(P.idct2(x), reference.idct2(x)) < tol
    row0, col0 = _origins(0, 24, 10, 16), _origins(13, 0, 8, 5)
    c = P.dct_block_analysis(x, row0, col0, 8, 11)
    assert _rel(c, reference.dct_block_analysis(x, row0, col0, 8, 11)) < tol
    assert _rel(P.dct_block_synthesis(c, row0, col0, 32, 24),
                reference.dct_block_synthesis(c, row0, col0, 32, 24)) < tol
    gap, grad = _select_inputs(n=9, k=5, m=50, seed=12, dtype=dtype)
    for p in (2, INF):
        got, want = P.deepfool_select(gap, grad, p, 1e-4), reference.deepfool_select(gap, grad, p, 1e-4)
        assert torch.equal(got[1], want[1])
        assert _rel(got[0], want[0]) < tol and _rel(got[2], want[2]) < tol


@pytest.mark.usefixtures("compiled")
def test_public_functions_dispatch_to_compiled():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, row0 = torch.rand(2, 1, 4, 4), _origins(0, 1)
    with Record():
        ops.dct2(x)
        ops.idct2(x)
        ops.dct_block_synthesis(ops.dct_block_analysis(x, row0, row0, 2, 2), row0, row0, 4, 4)
        ops.deepfool_select(-torch.rand(2, 3), torch.rand(2, 3, 4), 2)
    names = {"dct2", "idct2", "dct_block_analysis", "dct_block_synthesis", "deepfool_select"}
    assert {f"pyboundary.{n}.default" for n in names} <= set(seen), seen


# ---- autograd, opcheck, torch.compile --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_gradcheck(device):
    x = _rand(2, 1, 5, 4, seed=21, device=device).requires_grad_()
    row0, col0 = _origins(0, 2, device=device), _origins(1, 0, device=device)
    c = _rand(2, 1, 3, 3, seed=22, device=device).requires_grad_()
    assert torch.autograd.gradcheck(ops.dct2, (x,))
    assert torch.autograd.gradcheck(ops.idct2, (x,))
    assert torch.autograd.gradcheck(lambda t: ops.dct_block_analysis(t, row0, col0, 3, 3), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.dct_block_synthesis(t, row0, col0, 5, 4), (c,))
    assert torch.autograd.gradgradcheck(lambda t: ops.dct_block_analysis(t, row0, col0, 3, 3), (x,))


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_opcheck_every_op(device):
    P = torch.ops.pyboundary
    x = _rand(2, 3, 6, 5, seed=31, device=device)
    row0, col0 = _origins(0, 3, device=device), _origins(2, 0, device=device)
    c = _rand(2, 3, 3, 3, seed=32, device=device)
    gap, grad = _select_inputs(n=3, k=2, m=7, seed=33, device=device)
    cases = [
        (P.dct2, (x.requires_grad_(),)),
        (P.idct2, (_rand(3, 4, 7, seed=34, device=device, dtype=torch.float32),)),
        (P.dct_block_analysis, (x, row0, col0, 3, 3)),
        (P.dct_block_synthesis, (c.requires_grad_(), row0, col0, 6, 5)),
        (P.deepfool_select, (gap, grad, 2.0, 1e-4)),
        (P.deepfool_select, (gap.float(), grad.float(), INF, 0.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.usefixtures("compiled")
def test_torch_compile_fullgraph_smoke():
    row0, col0 = _origins(0, 4), _origins(1, 2)

    def f(x, gap, grad):
        c = ops.dct_block_analysis(ops.idct2(ops.dct2(x)), row0, col0, 4, 4)
        y = ops.dct_block_synthesis(c, row0, col0, 8, 8)
        step, index, dist = ops.deepfool_select(gap, grad, 2.0)
        return y, step, index, dist

    x = _rand(2, 1, 8, 8, seed=41)
    gap, grad = _select_inputs(n=2, k=3, m=5, seed=42)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    got, want = compiled(x, gap, grad), f(x, gap, grad)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---- validation ---------------------------------------------------------------------------

X4 = torch.zeros(2, 1, 8, 8)
R2 = torch.zeros(2, dtype=torch.int64)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: ops.dct2(torch.zeros(5)), ValueError, ["x", "dimensions", "5"]),
        (lambda: ops.dct2(torch.zeros(3, 3, dtype=torch.int32)), TypeError, ["x", "float32", "torch.int32"]),
        (lambda: ops.idct2(torch.zeros(3, 3, dtype=torch.float16)), TypeError, ["x", "torch.float16"]),
        (lambda: ops.dct_block_analysis(torch.zeros(1, 8, 8), R2[:1], R2[:1], 2, 2), ValueError,
         ["x", "(N, C, H, W)"]),
        (lambda: ops.dct_block_analysis(X4, R2, R2, 2, 9), ValueError, ["kw=9", "[1, 8]"]),
        (lambda: ops.dct_block_analysis(X4, R2, R2, 0, 2), ValueError, ["kh=0"]),
        (lambda: ops.dct_block_analysis(X4, torch.tensor([0, 7]), R2, 2, 2), ValueError,
         ["row0", "[0, 6]", "7"]),
        (lambda: ops.dct_block_analysis(X4, R2, torch.tensor([-1, 0]), 2, 2), ValueError,
         ["col0", "-1"]),
        (lambda: ops.dct_block_analysis(X4, R2[:1], R2, 2, 2), ValueError, ["row0", "(2,)"]),
        (lambda: ops.dct_block_analysis(X4, R2, R2.int(), 2, 2), TypeError, ["col0", "int64", "torch.int32"]),
        (lambda: ops.dct_block_synthesis(torch.zeros(2, 1, 3, 3), R2, R2, 8, 2), ValueError,
         ["kw=3", "[1, 2]"]),
        (lambda: ops.dct_block_synthesis(torch.zeros(2, 3, 3), R2, R2, 8, 8), ValueError,
         ["coeffs"]),
        (lambda: ops.dct_block_synthesis(torch.zeros(2, 1, 3, 3, dtype=torch.int64), R2, R2, 8, 8),
         TypeError, ["coeffs", "float"]),
        (lambda: ops.deepfool_select(torch.zeros(2, 3), torch.zeros(2, 4, 5), 2), ValueError,
         ["grad_gap", "gap", "(N, k)"]),
        (lambda: ops.deepfool_select(torch.zeros(2, 3), torch.zeros(2, 3, 5), 1), ValueError,
         ["p must be 2 or inf", "1"]),
        (lambda: ops.deepfool_select(torch.zeros(2, 3), torch.zeros(2, 3, 5), 2, -1.0), ValueError,
         ["eps", "-1"]),
        (lambda: ops.deepfool_select(torch.zeros(2), torch.zeros(2, 3, 5), 2), ValueError,
         ["gap", "(N, k)"]),
        (lambda: ops.deepfool_select(torch.zeros(2, 0), torch.zeros(2, 0, 5), 2), ValueError,
         ["k >= 1"]),
        (lambda: ops.deepfool_select(torch.zeros(2, 3), torch.zeros(2, 3, 5, dtype=torch.float64), 2),
         TypeError, ["dtypes differ"]),
    ],
)
def test_validation_messages(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.usefixtures("compiled")
def test_compiled_validation_messages_match_twin_kind():
    """The C++ checks raise the same exception class as the twin for each bad argument."""
    bad = [
        (lambda f: f.dct_block_analysis(X4, torch.tensor([0, 7]), R2, 2, 2)),
        (lambda f: f.dct_block_analysis(X4, R2, R2.int(), 2, 2)),
        (lambda f: f.deepfool_select(torch.zeros(2, 3), torch.zeros(2, 3, 5), 3.0, 1e-4)),
        (lambda f: f.dct2(torch.zeros(3, 3, dtype=torch.int32))),
    ]
    for call in bad:
        kinds = []
        for impl in (torch.ops.pyboundary, reference):
            with pytest.raises((ValueError, TypeError)) as info:
                call(impl)
            kinds.append(type(info.value))
        assert issubclass(kinds[0], kinds[1]) or issubclass(kinds[1], kinds[0]), kinds


@pytest.mark.cuda
def test_cuda_origins_on_wrong_device():
    x = torch.zeros(2, 1, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="row0"):
        ops.dct_block_analysis(x, R2, R2.cuda(), 2, 2)


@pytest.mark.parametrize("device", GPU_DEVICES, indirect=True)
def test_cuda_kernels_match_the_cpu_kernels(device):
    if device == "cuda":
        assert ops.backend()["cuda_kernels"], ops.backend()
    x = _rand(4, 3, 40, 36, seed=51)
    row0, col0 = _origins(0, 32, 5, 20), _origins(28, 0, 9, 14)
    rd, cd = row0.to(device), col0.to(device)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 5e-15)):
        xd = x.to(dtype)
        c_cpu = CPU_OPS.dct_block_analysis(xd, row0, col0, 8, 8)
        c_dev = ops.dct_block_analysis(xd.to(device), rd, cd, 8, 8)
        assert _rel(c_dev, c_cpu) < tol
        s_dev = ops.dct_block_synthesis(c_cpu.to(device), rd, cd, 40, 36)
        assert _rel(s_dev, CPU_OPS.dct_block_synthesis(c_cpu, row0, col0, 40, 36)) < tol
        assert _rel(ops.dct2(xd.to(device)), CPU_OPS.dct2(xd)) < tol
        assert _rel(ops.idct2(xd.to(device)), CPU_OPS.idct2(xd)) < tol
        gap, grad = _select_inputs(n=7, k=5, m=700, seed=52, dtype=dtype)
        for p in (2, INF):
            want = CPU_OPS.deepfool_select(gap, grad, p, 1e-4)
            got = ops.deepfool_select(gap.to(device), grad.to(device), p, 1e-4)
            assert torch.equal(got[1].cpu(), want[1])
            assert _rel(got[0], want[0]) < tol and _rel(got[2], want[2]) < tol


# ---- the emulated CUDA device: what only it can show ------------------------------------------

_HOST_COPY_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::to", "aten::_to_copy", "aten::copy_",
                  "aten::cpu", "aten::nonzero", "aten::mm", "aten::bmm", "aten::matmul")


@pytest.mark.cuda_emu
def test_emulated_cuda_ops_make_no_host_sync():
    """After the DCT matrices are cached, the CUDA ops synchronise never and copy nothing to the
    host (no origin read-back), and dct2 uses no matmul (so no TF32/cuBLAS setting applies)."""
    with cuda_emu.emulated() as emu:
        x, row0, col0, kh, kw = _case((3, 20, 24, 4, 6, (0, 16, 9), (18, 3, 0)), dtype=torch.float32)
        gap, grad = _select_inputs(n=4, k=3, m=50, seed=81, dtype=torch.float32)

        def calls():
            c = ops.dct_block_analysis(x, row0, col0, kh, kw)
            ops.dct_block_synthesis(c, row0, col0, 20, 24)
            ops.idct2(ops.dct2(x))
            ops.deepfool_select(gap, grad, 2.0)

        calls()  # fills the matrix cache: one synchronisation per new matrix
        cuda_emu.reset_stats()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            calls()
        stats = cuda_emu.stats()
        names = {e.name for e in prof.events()}
    assert stats["syncs"] == 0, stats
    assert stats["launches"] == 2 + 2 + 2 * 2 + 1, stats  # analysis, synthesis, dct2 + idct2, select
    assert stats["record_streams"] == 2 + 2 + 2 * 2, stats  # every matrix read is recorded on the stream
    assert {f"pyboundary_emu::{n}" for n in ("dct2", "dct_block_analysis", "deepfool_select")} <= names
    assert not names & set(_HOST_COPY_OPS), sorted(names & set(_HOST_COPY_OPS))
    del emu


@pytest.mark.cuda_emu
def test_emulated_cuda_checks_origins_on_the_device():
    """Out-of-range origins are caught by the kernels (device-side assert), not by a host read."""
    with cuda_emu.emulated():
        x = torch.zeros(2, 1, 8, 8)
        for row0, col0 in ((torch.tensor([0, 7]), R2), (R2, torch.tensor([-1, 0]))):
            with pytest.raises(RuntimeError, match="device-side assert triggered.*out of range"):
                ops.dct_block_analysis(x, row0, col0, 2, 2)
            with pytest.raises(RuntimeError, match="device-side assert triggered.*out of range"):
                ops.dct_block_synthesis(torch.zeros(2, 1, 2, 2), row0, col0, 8, 8)
        # and the next call is clean again
        assert ops.dct_block_analysis(x, R2, R2, 2, 2).shape == (2, 1, 2, 2)


@pytest.mark.cuda_emu
def test_emulated_cuda_empty_dct2_launches_nothing():
    with cuda_emu.emulated():
        cuda_emu.reset_stats()
        for shape in EMPTY_SHAPES:
            assert ops.dct2(torch.zeros(shape)).shape == shape
            assert ops.idct2(torch.zeros(shape)).shape == shape
        assert cuda_emu.stats()["launches"] == 0
