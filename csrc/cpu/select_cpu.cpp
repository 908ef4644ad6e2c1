// deepfool_select on CPU: one pass over each sample's k candidate gradients for the norms and
// the choice, one pass over the chosen gradient for the step. Parallel over samples.
#include "../common.h"
#include "../pyboundary_math.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <limits>
#include <vector>

namespace pyboundary {

namespace {

template <typename scalar_t>
void select_kernel(const scalar_t* gap, const scalar_t* grad, int64_t N, int64_t K, int64_t M,
                   bool p_inf, double eps_d, scalar_t* step, int64_t* index, scalar_t* dist) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* g_n = grad + n * K * M;
      int64_t best = 0;
      acc_t best_dist = std::numeric_limits<acc_t>::infinity();
      acc_t best_stat = 0;
      for (int64_t c = 0; c < K; ++c) {
        const scalar_t* g = g_n + c * M;
        acc_t stat = 0;
        if (p_inf) {
          for (int64_t m = 0; m < M; ++m) stat += math::select_norm_term<acc_t>(g[m], true);
        } else {
          for (int64_t m = 0; m < M; ++m) stat += math::select_norm_term<acc_t>(g[m], false);
        }
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
      const scalar_t* g = g_n + best * M;
      scalar_t* s = step + n * M;
      for (int64_t m = 0; m < M; ++m) {
        s[m] = static_cast<scalar_t>(math::select_step<acc_t>(scale, g[m], p_inf));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> deepfool_select_cpu(const at::Tensor& gap,
                                                                   const at::Tensor& grad_gap,
                                                                   double p, double eps) {
  const bool p_inf = check_select_args(gap, grad_gap, p, eps);
  const int64_t N = grad_gap.size(0), K = grad_gap.size(1), M = grad_gap.size(2);
  const at::Tensor gap_c = gap.contiguous();
  const at::Tensor grad_c = grad_gap.contiguous();
  at::Tensor step = at::empty({N, M}, grad_gap.options());
  at::Tensor index = at::empty({N}, gap.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, gap.options());
  if (N == 0) return {step, index, dist};
  AT_DISPATCH_FLOATING_TYPES(gap.scalar_type(), "deepfool_select_cpu", [&] {
    select_kernel<scalar_t>(gap_c.const_data_ptr<scalar_t>(), grad_c.const_data_ptr<scalar_t>(),
                            N, K, M, p_inf, eps, step.mutable_data_ptr<scalar_t>(),
                            index.mutable_data_ptr<int64_t>(), dist.mutable_data_ptr<scalar_t>());
  });
  return {step, index, dist};
}

}  // namespace pyboundary
