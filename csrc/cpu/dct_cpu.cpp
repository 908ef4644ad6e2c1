// CPU kernels of the DCT ops and the CPU registration of every op.
//
// dct2 / idct2: the cached DCT matrices (built from math::dct_coef) applied to each image with
// the small-product kernel below (measured faster than ATen matmul/MKL for small images and
// on par at 224 x 224; MKL's threads also stall on small products when the CPU is busy).
// Block ops: the separable two-stage contraction per (sample, channel) with the same kernel,
// cost O(N C kh H W), no H x W transform and no per-sample copies of the DCT rows (a block's
// rows are a slice of the cached matrix). The kernel is compiled for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2+FMA) and baseline, chosen at load time (GCC function multi-versioning);
// other platforms get the baseline.
#include "../common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PYB_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYB_MULTIVERSION
#endif

#if !defined(__GNUC__)
#error "csrc/cpu needs GCC or Clang (vector extensions)"
#endif
#define PYB_ALWAYS_INLINE inline __attribute__((always_inline))

namespace pyboundary {

namespace {

// out[r, w] = sum_j coef[r, j] * in[j, w] for RB rows and NV vectors of VB bytes along w:
// the RB x NV accumulators stay in registers while j runs, each input vector is loaded once per
// RB rows, each coefficient broadcast once per NV vectors (GCC/Clang vector extensions; the
// 32-byte vectors map to AVX/AVX-512VL registers in the multi-versioned clones, to SSE pairs
// in the baseline).
template <typename T, int VB, int NV, int RB>
PYB_ALWAYS_INLINE void vec_tile(T* __restrict out, int64_t ldo, const T* __restrict coef,
                                int64_t ldc, const T* __restrict in, int64_t ldi, int64_t J) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int L = VB / static_cast<int>(sizeof(T));
  V acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t j = 0; j < J; ++j) {
    V x[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&x[v], in + j * ldi + v * L, VB);
    for (int r = 0; r < RB; ++r) {
      const V c = V{} + coef[r * ldc + j];
      for (int v = 0; v < NV; ++v) acc[r][v] += c * x[v];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(out + r * ldo + v * L, &acc[r][v], VB);
}

// One output column (the last < 4 float / < 2 double columns of a row block).
template <typename T, int RB>
PYB_ALWAYS_INLINE void scalar_tile(T* __restrict out, int64_t ldo, const T* __restrict coef,
                                   int64_t ldc, const T* __restrict in, int64_t ldi, int64_t J) {
  T acc[RB] = {};
  for (int64_t j = 0; j < J; ++j)
    for (int r = 0; r < RB; ++r) acc[r] += coef[r * ldc + j] * in[j * ldi];
  for (int r = 0; r < RB; ++r) out[r * ldo] = acc[r];
}

// RB rows of the product, all Wn columns: tiles of 2 x 32 bytes, then 32, 16 bytes, then scalars.
template <typename T, int RB>
PYB_ALWAYS_INLINE void gemm_rows(T* out, int64_t ldo, const T* coef, int64_t ldc, const T* in,
                                 int64_t ldi, int64_t J, int64_t Wn) {
  constexpr int64_t L = 32 / sizeof(T);
  int64_t w = 0;
  for (; w + 2 * L <= Wn; w += 2 * L) vec_tile<T, 32, 2, RB>(out + w, ldo, coef, ldc, in + w, ldi, J);
  if (w + L <= Wn) {
    vec_tile<T, 32, 1, RB>(out + w, ldo, coef, ldc, in + w, ldi, J);
    w += L;
  }
  if (w + L / 2 <= Wn) {
    vec_tile<T, 16, 1, RB>(out + w, ldo, coef, ldc, in + w, ldi, J);
    w += L / 2;
  }
  for (; w < Wn; ++w) scalar_tile<T, RB>(out + w, ldo, coef, ldc, in + w, ldi, J);
}

// out (R x Wn, row stride ldo) = coef (R x J, row stride ldc) @ in (J x Wn, row stride ldi).
// Row blocks of 8 (16 accumulators: fits the 32 AVX-512 vector registers), then 4, then 1.
template <typename T>
PYB_ALWAYS_INLINE void small_gemm_impl(T* out, int64_t ldo, const T* coef, int64_t ldc,
                                       const T* in, int64_t ldi, int64_t R, int64_t J,
                                       int64_t Wn) {
  int64_t r = 0;
  for (; r + 8 <= R; r += 8) gemm_rows<T, 8>(out + r * ldo, ldo, coef + r * ldc, ldc, in, ldi, J, Wn);
  for (; r + 4 <= R; r += 4) gemm_rows<T, 4>(out + r * ldo, ldo, coef + r * ldc, ldc, in, ldi, J, Wn);
  for (; r < R; ++r) gemm_rows<T, 1>(out + r * ldo, ldo, coef + r * ldc, ldc, in, ldi, J, Wn);
}

PYB_MULTIVERSION void small_gemm(float* out, int64_t ldo, const float* coef, int64_t ldc,
                                 const float* in, int64_t ldi, int64_t R, int64_t J, int64_t Wn) {
  small_gemm_impl<float>(out, ldo, coef, ldc, in, ldi, R, J, Wn);
}

PYB_MULTIVERSION void small_gemm(double* out, int64_t ldo, const double* coef, int64_t ldc,
                                 const double* in, int64_t ldi, int64_t R, int64_t J,
                                 int64_t Wn) {
  small_gemm_impl<double>(out, ldo, coef, ldc, in, ldi, R, J, Wn);
}

at::Tensor cpu_builder(int64_t n, at::ScalarType dtype, c10::Device, bool transposed) {
  return build_dct_matrix_cpu(n, dtype, transposed);
}

at::Tensor cpu_matrix(int64_t n, at::ScalarType dtype, bool transposed) {
  return dct_matrix_cached(n, dtype, c10::Device(c10::kCPU), transposed, cpu_builder);
}

// Items of work (sample, channel) per parallel chunk: enough to amortise the scheduling.
int64_t block_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_item));
}

}  // namespace

// dct2 / idct2 of every H x W image with the two small products of the block kernels:
// T = X M_W (columns), Y = M_H T (rows); forward M_W = C_W^T, M_H = C_H; inverse M_W = C_W,
// M_H = C_H^T. Cost O(B H W (H + W)), parallel over images.
static at::Tensor dct2_direct(const at::Tensor& x, bool inverse) {
  const int64_t H = x.size(-2), W = x.size(-1);
  const int64_t B = x.numel() / (H * W);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dct2_cpu", [&] {
    const scalar_t* mw = cpu_matrix(W, x.scalar_type(), !inverse).const_data_ptr<scalar_t>();
    const scalar_t* mh = cpu_matrix(H, x.scalar_type(), inverse).const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, block_grain(H * W * (H + W)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp(static_cast<size_t>(H * W));
      for (int64_t b = begin; b < end; ++b) {
        small_gemm(tmp.data(), W, xp + b * H * W, W, mw, W, H, W, W);
        small_gemm(op_ + b * H * W, W, mh, H, tmp.data(), W, H, H, W);
      }
    });
  });
  return out;
}

static at::Tensor dct2_cpu_any(const at::Tensor& x, bool inverse) {
  const char* op = inverse ? "idct2" : "dct2";
  check_float(op, "x", x);
  check_rank(op, "x", x, 2, "(..., H, W)", /*at_least=*/true);
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());
  return dct2_direct(x, inverse);
}

at::Tensor dct2_cpu(const at::Tensor& x) { return dct2_cpu_any(x, false); }
at::Tensor idct2_cpu(const at::Tensor& x) { return dct2_cpu_any(x, true); }

at::Tensor dct_block_analysis_cpu(const at::Tensor& x, const at::Tensor& row0,
                                  const at::Tensor& col0, int64_t kh, int64_t kw) {
  const char* op = "dct_block_analysis";
  check_float(op, "x", x);
  check_rank(op, "x", x, 4, "(N, C, H, W)", false);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_origins(op, N, row0, col0, x.device(), kh, kw, H, W);
  at::Tensor out = at::empty({N, C, kh, kw}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor r0 = row0.contiguous(), c0 = col0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dct_block_analysis_cpu", [&] {
    // A_h = C_H[row0 : row0 + kh] (kh x H), A_w^T = C_W^T[:, col0 : col0 + kw] (W x kw).
    const scalar_t* ch = cpu_matrix(H, x.scalar_type(), false).const_data_ptr<scalar_t>();
    const scalar_t* cwt = cpu_matrix(W, x.scalar_type(), true).const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const int64_t* rp = r0.const_data_ptr<int64_t>();
    const int64_t* cp = c0.const_data_ptr<int64_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, block_grain(kh * H * W), [&](int64_t begin, int64_t end) {
      // Columns first, T = X A_w^T (H x kw), then coeffs = A_h T: X is read once, row by row
      // (measured 3-4x faster at 224 x 224, K = 16, than rows first, which walks X in strips).
      std::vector<scalar_t> tmp(static_cast<size_t>(H * kw));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / C;
        small_gemm(tmp.data(), kw, xp + item * H * W, W, cwt + cp[n], W, H, W, kw);
        small_gemm(op_ + item * kh * kw, kw, ch + rp[n] * H, H, tmp.data(), kw, kh, H, kw);
      }
    });
  });
  return out;
}

at::Tensor dct_block_synthesis_cpu(const at::Tensor& coeffs, const at::Tensor& row0,
                                   const at::Tensor& col0, int64_t H, int64_t W) {
  const char* op = "dct_block_synthesis";
  check_float(op, "coeffs", coeffs);
  check_rank(op, "coeffs", coeffs, 4, "(N, C, kh, kw)", false);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, op, ": H and W must be >= 1, got H=", H, ", W=", W);
  const int64_t N = coeffs.size(0), C = coeffs.size(1);
  const int64_t kh = coeffs.size(2), kw = coeffs.size(3);
  check_origins(op, N, row0, col0, coeffs.device(), kh, kw, H, W);
  at::Tensor out = at::empty({N, C, H, W}, coeffs.options());
  if (out.numel() == 0) return out;
  const at::Tensor cc = coeffs.contiguous();
  const at::Tensor r0 = row0.contiguous(), c0 = col0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "dct_block_synthesis_cpu", [&] {
    // A_w = C_W[col0 : col0 + kw] (kw x W), A_h^T = C_H^T[:, row0 : row0 + kh] (H x kh).
    const scalar_t* cw = cpu_matrix(W, coeffs.scalar_type(), false).const_data_ptr<scalar_t>();
    const scalar_t* cht = cpu_matrix(H, coeffs.scalar_type(), true).const_data_ptr<scalar_t>();
    const scalar_t* cp_ = cc.const_data_ptr<scalar_t>();
    const int64_t* rp = r0.const_data_ptr<int64_t>();
    const int64_t* cp = c0.const_data_ptr<int64_t>();
    scalar_t* xp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, block_grain(kh * H * W), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp(static_cast<size_t>(kh * W));  // U = coeffs A_w  (kh x W)
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / C;
        small_gemm(tmp.data(), W, cp_ + item * kh * kw, kw, cw + cp[n] * W, W, kh, kw, W);
        small_gemm(xp + item * H * W, W, cht + rp[n], H, tmp.data(), W, H, kh, W);
      }
    });
  });
  return out;
}

}  // namespace pyboundary

TORCH_LIBRARY_IMPL(pyboundary, CPU, m) {
  m.impl("dct2", &pyboundary::dct2_cpu);
  m.impl("idct2", &pyboundary::idct2_cpu);
  m.impl("dct_block_analysis", &pyboundary::dct_block_analysis_cpu);
  m.impl("dct_block_synthesis", &pyboundary::dct_block_synthesis_cpu);
  m.impl("deepfool_select", &pyboundary::deepfool_select_cpu);
}
