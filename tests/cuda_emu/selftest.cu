// Self-test kernel of the CUDA emulator (tests/cuda_emu/test_emulator.py), compiled through the
// same rewrite as csrc/cuda/*.cu: launch configuration checks, built-in variables, __shared__
// storage per block and the __syncthreads barrier.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace {

// Every thread writes t + 1 + 1000 * block into shared memory; after a barrier it reads its
// mirror thread's value and, after a second barrier, stores it in its own slot; after a third,
// thread 0 returns sum_i (i + 1) vals[i] = sum_i (i + 1) (n - i + 1000 * block), which needs
// every barrier and per-block shared memory. Every thread also counts itself.
__global__ void barrier_kernel(int64_t* __restrict__ sums, int64_t* __restrict__ count) {
  __shared__ int64_t vals[1024];
  const int n = blockDim.x * blockDim.y * blockDim.z;
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int64_t block = blockIdx.x + gridDim.x * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
  vals[t] = t + 1 + 1000 * block;
  __syncthreads();
  const int64_t mirror = vals[n - 1 - t];
  __syncthreads();
  vals[t] = mirror;
  __syncthreads();
  if (t == 0) {
    int64_t s = 0;
    for (int i = 0; i < n; ++i) s += (i + 1) * vals[i];
    sums[block] = s;
  }
  atomicAdd(reinterpret_cast<unsigned long long*>(count), 1ull);
}

// (sums per block (gx * gy * gz,), threads run (1,)) of one launch of barrier_kernel.
std::tuple<at::Tensor, at::Tensor> emu_selftest(int64_t gx, int64_t gy, int64_t gz, int64_t bx,
                                                int64_t by, int64_t bz) {
  const int64_t blocks = std::max<int64_t>(gx * gy * gz, 0);
  at::Tensor sums = at::zeros({blocks}, at::kLong);
  at::Tensor count = at::zeros({1}, at::kLong);
  const dim3 grid(gx, gy, gz), block(bx, by, bz);
  barrier_kernel<<<grid, block, 0, nullptr>>>(sums.mutable_data_ptr<int64_t>(),
                                             count.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sums, count};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyboundary_emu, m) {
  m.def("_emu_selftest(int gx, int gy, int gz, int bx, int by, int bz) -> (Tensor, Tensor)",
        &emu_selftest);
}
