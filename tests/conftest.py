import os

import pytest
import torch

# Two cores: keep intra-op threads modest so parallel test workers do not oversubscribe.
torch.set_num_threads(int(os.environ.get("PYBOUNDARY_TEST_THREADS", "2")))


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (tiny models: faster, no contention with parallel jobs).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the previous count is restored.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "cuda_emu: runs the CUDA kernels on the emulated device (make cuda-emu)")
    config.addinivalue_line("markers", "slow: long-running test, excluded from the default run")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
