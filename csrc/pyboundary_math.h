// Per-element arithmetic of the pyboundary ops, shared by the CPU (csrc/cpu) and CUDA
// (csrc/cuda) kernels. Everything here is a header-only __host__ __device__ inline function
// with no ATen dependency, so that both compilers see the same formulas.
//
// Contracts: pyboundary/reference.py (the pure-torch twins) is the executable specification.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYB_HD __host__ __device__ __forceinline__
#else
#define PYB_HD inline
#endif

namespace pyboundary {
namespace math {

// deepfool_select's default relative push past the linearised boundary (the schema default of
// `eps`) and the absolute floor of the push in logit units. The Python side reads both through
// torch.ops.pyboundary._select_constants(); a test checks every copy against it.
constexpr double kSelectDefaultEps = 1e-4;
constexpr double kSelectAbsPush = 1e-3;
constexpr double kPi = 3.14159265358979323846264338327950288;

// Entry C_n[k, i] of the orthonormal DCT-II matrix (row k = frequency, column i = sample):
//   C_n[k, i] = a_k cos(pi (2 i + 1) k / (2 n)),  a_0 = sqrt(1/n), a_k = sqrt(2/n).
// The angle is reduced exactly in integers ((2i+1)k mod 4n) before the cosine, so the result
// is accurate to a few ulp of double for every n (no large-argument cosine).
PYB_HD double dct_coef(int64_t n, int64_t k, int64_t i) {
  const int64_t m = ((2 * i + 1) * k) % (4 * n);
  const double angle = kPi * static_cast<double>(m) / (2.0 * static_cast<double>(n));
  const double a = (k == 0) ? sqrt(1.0 / static_cast<double>(n))
                            : sqrt(2.0 / static_cast<double>(n));
  return a * cos(angle);
}

// ---- block ops ------------------------------------------------------------------------
// Whether a block of k frequencies starting at origin o lies inside a dimension of `size`
// (checked on the host for CPU inputs and inside the kernels for CUDA inputs).
PYB_HD bool block_origin_ok(int64_t o, int64_t k, int64_t size) { return o >= 0 && o <= size - k; }

// ---- deepfool_select -------------------------------------------------------------------
// p is encoded as a flag: p_inf = false -> p = 2 (dual norm q = 2), true -> p = inf (q = 1).
//
// Accumulation: the norm statistics, distances, push and step scale are computed in double for
// float32 and float64 inputs on every device (a float32 sum of thousands of squares is off by
// ~1e-6 relative, enough to flip a near-tie between candidates differently on CPU and CUDA,
// whose summation orders differ). Only the step entries are computed in the input type:
// select_step<scalar_t>(scale rounded once to scalar_t, g).
template <typename scalar_t>
using select_acc_t = double;

// Contribution of one gradient entry g to the accumulated norm statistic:
// p = 2: g^2 (the squared 2-norm is accumulated), p = inf: |g| (the 1-norm).
template <typename acc_t>
PYB_HD acc_t select_norm_term(acc_t g, bool p_inf) {
  return p_inf ? (g < 0 ? -g : g) : g * g;
}

// The dual norm ||g||_q from the accumulated statistic (sqrt for p = 2).
template <typename acc_t>
PYB_HD acc_t select_norm(acc_t stat, bool p_inf) {
  return p_inf ? stat : sqrt(stat);
}

// Distance to the linearised boundary of one candidate: |gap| / ||g||_q, +inf for a zero norm
// (such a candidate is never chosen and produces no NaN).
template <typename acc_t>
PYB_HD acc_t select_dist(acc_t abs_gap, acc_t norm) {
  return norm == acc_t(0) ? std::numeric_limits<acc_t>::infinity() : abs_gap / norm;
}

// Length of the push along the chosen gradient, in logit units: (1 + eps)|gap| + 1e-3 eps,
// so that gap + <g, step> = eps (|gap| + 1e-3) >= 0 (just past the linearised boundary).
template <typename acc_t>
PYB_HD acc_t select_push(acc_t abs_gap, acc_t eps) {
  return (acc_t(1) + eps) * abs_gap + acc_t(kSelectAbsPush) * eps;
}

// Step scale: push / ||g||_2^2 (p = 2) or push / ||g||_1 (p = inf); 0 for a zero gradient.
// denom is the accumulated statistic of the chosen candidate (squared 2-norm or 1-norm).
template <typename acc_t>
PYB_HD acc_t select_scale(acc_t push, acc_t denom) {
  return denom == acc_t(0) ? acc_t(0) : push / denom;
}

// One entry of the step in the input type: scale * g (p = 2) or scale * sign(g) (p = inf),
// with scale already rounded to scalar_t (one rounding, the same on every device).
template <typename scalar_t>
PYB_HD scalar_t select_step(scalar_t scale, scalar_t g, bool p_inf) {
  if (!p_inf) return scale * g;
  return g > scalar_t(0) ? scale : (g < scalar_t(0) ? -scale : scalar_t(0));
}

// Strictly-smaller comparison used for the argmin (first minimum wins, like torch.min on CPU).
// NaN distances win so that a NaN input is propagated, never hidden.
template <typename acc_t>
PYB_HD bool select_better(acc_t d, acc_t best) {
  return d < best || (d != d && best == best);
}

}  // namespace math
}  // namespace pyboundary
