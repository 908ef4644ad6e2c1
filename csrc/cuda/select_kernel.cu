// deepfool_select on CUDA: one thread block per sample. Pass 1: for each candidate, a block
// reduction of the norm statistic and the choice (thread 0); pass 2: all threads write the step.
// Statistics, distances and the scale in math::select_acc_t (double, as on CPU: near-ties are
// decided the same way on both devices); step entries in the input dtype. Registered for the
// CUDA dispatch key here.
#include "cuda_kernels.h"

#include "../checks.h"
#include "../pyboundary_math.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace pyboundary {

namespace {

constexpr int kSelectThreads = 256;  // power of two (tree reduction)

template <typename scalar_t>
__global__ void select_kernel(const scalar_t* __restrict__ gap, const scalar_t* __restrict__ grad,
                              int64_t K, int64_t M, bool p_inf, double eps_d,
                              scalar_t* __restrict__ step, int64_t* __restrict__ index,
                              scalar_t* __restrict__ dist) {
  using acc_t = math::select_acc_t<scalar_t>;
  __shared__ acc_t red[kSelectThreads];
  __shared__ acc_t best_dist, best_stat;
  __shared__ int64_t best;
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* g_n = grad + n * K * M;
  for (int64_t c = 0; c < K; ++c) {
    const scalar_t* g = g_n + c * M;
    acc_t part = 0;
    for (int64_t m = tid; m < M; m += kSelectThreads) {
      part += math::select_norm_term<acc_t>(static_cast<acc_t>(g[m]), p_inf);
    }
    red[tid] = part;
    __syncthreads();
    for (int s = kSelectThreads / 2; s > 0; s >>= 1) {
      if (tid < s) red[tid] += red[tid + s];
      __syncthreads();
    }
    if (tid == 0) {
      const acc_t stat = red[0];
      const acc_t abs_gap = fabs(static_cast<acc_t>(gap[n * K + c]));
      const acc_t d = math::select_dist(abs_gap, math::select_norm(stat, p_inf));
      if (c == 0 || math::select_better(d, best_dist)) {
        best = c;
        best_dist = d;
        best_stat = stat;
      }
    }
    __syncthreads();
  }
  __shared__ scalar_t scale;
  if (tid == 0) {
    index[n] = best;
    dist[n] = static_cast<scalar_t>(best_dist);
    const acc_t push =
        math::select_push(fabs(static_cast<acc_t>(gap[n * K + best])), static_cast<acc_t>(eps_d));
    scale = static_cast<scalar_t>(math::select_scale(push, best_stat));
  }
  __syncthreads();
  const scalar_t* g = g_n + best * M;
  scalar_t* s = step + n * M;
  for (int64_t m = tid; m < M; m += kSelectThreads) {
    s[m] = math::select_step<scalar_t>(scale, g[m], p_inf);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> deepfool_select_cuda(const at::Tensor& gap,
                                                                    const at::Tensor& grad_gap,
                                                                    double p, double eps) {
  SelectArgs b = check_select_args(gap, grad_gap, p, eps);
  const c10::cuda::CUDAGuard guard(grad_gap.device());
  const int64_t N = grad_gap.size(0), K = grad_gap.size(1), M = grad_gap.size(2);
  if (N == 0) return b.outputs();
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int>::max(), "deepfool_select: N=", N,
                    " samples exceed the CUDA grid limit");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gap.scalar_type(), "deepfool_select_cuda", [&] {
    select_kernel<scalar_t><<<static_cast<unsigned int>(N), kSelectThreads, 0, stream>>>(
        b.gap.const_data_ptr<scalar_t>(), b.grad_gap.const_data_ptr<scalar_t>(), K, M, b.p_inf, eps,
        b.step.mutable_data_ptr<scalar_t>(), b.index.mutable_data_ptr<int64_t>(),
        b.dist.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return b.outputs();
}

}  // namespace pyboundary

TORCH_LIBRARY_IMPL(pyboundary, CUDA, m) {
  m.impl("deepfool_select", &pyboundary::deepfool_select_cuda);
}
