"""Tests of the CUDA emulator itself (tests/cuda_emu): it runs kernels as CUDA does, and it
fails when a kernel is broken.

Run by `make cuda-emu` (ASan runtime preloaded); skipped elsewhere. The broken-variant tests
build deliberately broken copies of the real kernels (tests/cuda_emu/build.py VARIANTS; cached
by source hash, each recompiles only the file it changes) and run one op in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cuda_emu import build
from cuda_emu import shim as cuda_emu

pytestmark = pytest.mark.cuda_emu


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.ops()


def _expected_sums(grid, block):
    n = block[0] * block[1] * block[2]
    blocks = grid[0] * grid[1] * grid[2]
    return torch.tensor([sum((i + 1) * (n - i + 1000 * b) for i in range(n)) for b in range(blocks)])


@pytest.mark.parametrize(
    "grid,block",
    [((1, 1, 1), (1, 1, 1)), ((3, 1, 1), (256, 1, 1)), ((2, 3, 2), (8, 4, 2)), ((1, 1, 1), (1024, 1, 1)),
     ((5, 1, 1), (33, 1, 1))],
)
def test_launch_runs_every_thread_with_working_barriers(emu, grid, block):
    """Each thread reads its mirror thread's shared value after a barrier: the block sums come
    out right only if the barrier holds and __shared__ is per block."""
    sums, count = emu._emu_selftest(*grid, *block)
    assert torch.equal(sums, _expected_sums(grid, block))
    assert int(count) == grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2]


@pytest.mark.parametrize(
    "grid,block",
    [((0, 1, 1), (256, 1, 1)), ((1, 0, 1), (32, 1, 1)), ((4, 1, 1), (0, 1, 1)), ((1, 1, 1), (1025, 1, 1)),
     ((1, 1, 1), (32, 32, 2)), ((1, 65536, 1), (1, 1, 1)), ((1, 1, 1), (1, 1, 65))],
)
def test_invalid_launch_configuration_fails_like_cuda(emu, grid, block):
    cuda_emu.reset_stats()
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emu._emu_selftest(*grid, *block)
    assert cuda_emu.stats()["blocks"] == 0
    emu._emu_selftest(1, 1, 1, 2, 1, 1)  # the error was reported once and cleared


def test_rewrite_of_launches():
    src = textwrap.dedent(
        """\
        k<float><<<blocks_for(n * m), kThreads, 0, stream>>>(
            a, f(b, c),
            d);
        other<<<g, b>>>();
        """
    )
    out, n = build.rewrite_launches(src)
    assert n == 2
    assert out.count("\n") == src.count("\n")  # lines stay where they were
    assert '::pyb_emu::launch("k", k<float>, blocks_for(n * m), kThreads, 0, stream, \n    a, f(b, c),\n    d);' in out
    assert '::pyb_emu::launch("other", other, g, b, 0, nullptr)' in out
    with pytest.raises(ValueError, match="registers into|would register"):
        build.rewrite_source("csrc/cuda/x.cu", "k<<<1, 1>>>(); TORCH_LIBRARY_IMPL(pyboundary, CUDA, m) {}\n"
                                                "TORCH_LIBRARY_IMPL(pyboundary, CPU, m) {}")


# ---- broken kernels must fail ---------------------------------------------------------------

_STRIDE_SCRIPT = """
import sys, torch
torch.ops.load_library(sys.argv[1])
x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
row0, col0 = torch.tensor([12, 0]), torch.tensor([0, 8])  # the first block touches the bottom edge
c = torch.ops.pyboundary_emu.dct_block_analysis(x, row0, col0, 4, 4)
print("finished", float(c.abs().sum()))
"""

_SELECT_SCRIPT = """
import sys, torch
torch.ops.load_library(sys.argv[1])
g = torch.Generator().manual_seed(0)
gap = -torch.rand(8, 4, generator=g, dtype=torch.float64)
grad = torch.randn(8, 4, 700, generator=g, dtype=torch.float64)
step, index, dist = torch.ops.pyboundary_emu.deepfool_select(gap, grad, 2.0, 1e-4)
norm = grad.norm(dim=-1)
want_dist, want_index = (gap.abs() / norm).min(dim=1)
print("index_ok", bool(torch.equal(index, want_index)))
print("dist_err", float(((dist - want_dist).abs() / want_dist).max()))
"""


def _run_with_library(script: str, lib) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_PRELOAD=build.preload(), ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([sys.executable, "-c", script, str(lib)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("variant", [None, "broken-stride"])
def test_wrong_row_stride_is_a_heap_overflow(variant):
    lib = build.build(variant, log=lambda m: None)
    out = _run_with_library(_STRIDE_SCRIPT, lib)
    if variant is None:
        assert out.returncode == 0 and "finished" in out.stdout, out.stderr[-3000:]
    else:
        assert out.returncode != 0 and "finished" not in out.stdout
        assert "ERROR: AddressSanitizer: heap-buffer-overflow" in out.stderr, out.stderr[-3000:]
        assert "rows_kernel" in out.stderr and "dct_kernel.cu" in out.stderr


@pytest.mark.parametrize("variant", [None, "no-barrier"])
def test_missing_barrier_gives_wrong_reductions(variant):
    lib = build.build(variant, log=lambda m: None)
    out = _run_with_library(_SELECT_SCRIPT, lib)
    assert out.returncode == 0, out.stderr[-3000:]
    values = dict(line.split() for line in out.stdout.splitlines())
    if variant is None:
        assert values["index_ok"] == "True" and float(values["dist_err"]) < 1e-14
    else:
        assert values["index_ok"] == "False" or float(values["dist_err"]) > 1e-3, values
        assert float(values["dist_err"]) > 1e-3, values
