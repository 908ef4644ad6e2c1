// deepfool_select on CPU: one pass over each sample's k candidate gradients for the norms and
// the choice, one pass over the chosen gradient for the step. Parallel over samples. Registered
// for the CPU dispatch key here.
#include "cpu_kernels.h"

#include "../checks.h"
#include "../pyboundary_math.h"
#include "multiversion.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace pyboundary {

namespace {

// Norm statistic of one gradient row (sum of g^2 for p = 2, of |g| for p = inf) in acc_t, with
// kLanes independent partial sums so that the loop vectorises (a fixed, deterministic order).
constexpr int kLanes = 16;

template <typename scalar_t, typename acc_t, bool P_INF>
inline __attribute__((always_inline)) acc_t norm_stat_impl(const scalar_t* __restrict g,
                                                           int64_t M) {
  acc_t part[kLanes] = {};
  int64_t m = 0;
  for (; m + kLanes <= M; m += kLanes)
    for (int u = 0; u < kLanes; ++u)
      part[u] += math::select_norm_term<acc_t>(static_cast<acc_t>(g[m + u]), P_INF);
  acc_t s = 0;
  for (int u = 0; u < kLanes; ++u) s += part[u];
  for (; m < M; ++m) s += math::select_norm_term<acc_t>(static_cast<acc_t>(g[m]), P_INF);
  return s;
}

template <typename scalar_t, bool P_INF>
inline __attribute__((always_inline)) void step_impl(scalar_t* __restrict s,
                                                     const scalar_t* __restrict g, int64_t M,
                                                     scalar_t scale) {
  for (int64_t m = 0; m < M; ++m) s[m] = math::select_step<scalar_t>(scale, g[m], P_INF);
}

using acc_float = math::select_acc_t<float>;
using acc_double = math::select_acc_t<double>;

PYB_MULTIVERSION acc_float norm_stat(const float* g, int64_t M, bool p_inf) {
  return p_inf ? norm_stat_impl<float, acc_float, true>(g, M)
               : norm_stat_impl<float, acc_float, false>(g, M);
}
PYB_MULTIVERSION acc_double norm_stat(const double* g, int64_t M, bool p_inf) {
  return p_inf ? norm_stat_impl<double, acc_double, true>(g, M)
               : norm_stat_impl<double, acc_double, false>(g, M);
}
PYB_MULTIVERSION void write_step(float* s, const float* g, int64_t M, float scale, bool p_inf) {
  if (p_inf) {
    step_impl<float, true>(s, g, M, scale);
  } else {
    step_impl<float, false>(s, g, M, scale);
  }
}
PYB_MULTIVERSION void write_step(double* s, const double* g, int64_t M, double scale, bool p_inf) {
  if (p_inf) {
    step_impl<double, true>(s, g, M, scale);
  } else {
    step_impl<double, false>(s, g, M, scale);
  }
}

// Statistics, distances and the step scale in math::select_acc_t (double); the step entries in
// the input dtype with the scale rounded once (as the CUDA kernel does).
template <typename scalar_t>
void select_kernel(const scalar_t* gap, const scalar_t* grad, int64_t N, int64_t K, int64_t M,
                   bool p_inf, double eps, scalar_t* step, int64_t* index, scalar_t* dist) {
  using acc_t = math::select_acc_t<scalar_t>;
  // Samples per parallel chunk: at least ~2^18 gradient entries (small batches run inline).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* g_n = grad + n * K * M;
      int64_t best = 0;
      acc_t best_dist = std::numeric_limits<acc_t>::infinity();
      acc_t best_stat = 0;
      for (int64_t c = 0; c < K; ++c) {
        const acc_t stat = norm_stat(g_n + c * M, M, p_inf);
        const acc_t abs_gap = std::abs(static_cast<acc_t>(gap[n * K + c]));
        const acc_t d = math::select_dist(abs_gap, math::select_norm(stat, p_inf));
        if (c == 0 || math::select_better(d, best_dist)) {
          best = c;
          best_dist = d;
          best_stat = stat;
        }
      }
      index[n] = best;
      dist[n] = static_cast<scalar_t>(best_dist);
      const acc_t push = math::select_push(std::abs(static_cast<acc_t>(gap[n * K + best])), eps);
      const acc_t scale = math::select_scale(push, best_stat);
      write_step(step + n * M, g_n + best * M, M, static_cast<scalar_t>(scale), p_inf);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> deepfool_select_cpu(const at::Tensor& gap,
                                                                   const at::Tensor& grad_gap,
                                                                   double p, double eps) {
  SelectArgs b = check_select_args(gap, grad_gap, p, eps);
  const int64_t N = grad_gap.size(0), K = grad_gap.size(1), M = grad_gap.size(2);
  if (N == 0) return b.outputs();
  AT_DISPATCH_FLOATING_TYPES(gap.scalar_type(), "deepfool_select_cpu", [&] {
    select_kernel<scalar_t>(b.gap.const_data_ptr<scalar_t>(),
                            b.grad_gap.const_data_ptr<scalar_t>(), N, K, M, b.p_inf, eps,
                            b.step.mutable_data_ptr<scalar_t>(), b.index.mutable_data_ptr<int64_t>(),
                            b.dist.mutable_data_ptr<scalar_t>());
  });
  return b.outputs();
}

}  // namespace pyboundary

TORCH_LIBRARY_IMPL(pyboundary, CPU, m) {
  m.impl("deepfool_select", &pyboundary::deepfool_select_cpu);
}
