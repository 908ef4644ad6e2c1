import os

import pytest
import torch

# Benchmarks of every module: a fixed, documented thread count so that ratios are comparable.
torch.set_num_threads(int(os.environ.get("PYBOUNDARY_BENCH_THREADS", "2")))


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the op benchmarks (cpu or cuda; benchmarks/run_gpu.py uses cuda)")


@pytest.fixture(scope="session")
def bench_device(request):
    """torch.device of the benchmarks (--device); a requested CUDA device must be usable."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda but torch.cuda.is_available() is False")
    return dev
