import os

import torch

# Benchmarks of every module: a fixed, documented thread count so that ratios are comparable.
torch.set_num_threads(int(os.environ.get("PYBOUNDARY_BENCH_THREADS", "2")))
