// CPU kernels of the DCT ops (dct2, idct2, dct_block_analysis, dct_block_synthesis) and their
// CPU registration.
//
// dct2 / idct2: per image, one small product along each dimension with the cached DCT
// matrices (built from math::dct_coef); from 64 x 64 on through the even/odd butterfly of C_n
// (C_n[k, n-1-i] = (-1)^k C_n[k, i]), which halves the multiply-adds. Measured at least as fast
// as the ATen/MKL matmul twin at 28 and 32 pixels and 1.7x faster at 224.
// Block ops: the separable two-stage contraction per (sample, channel) with the same kernel,
// cost O(N C K H W), no H x W transform and no per-sample copies of the DCT rows (a block's
// rows are a slice of the cached matrix).
// The product kernel is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline,
// chosen at load time (GCC function multi-versioning); other platforms get the baseline.
#include "cpu_kernels.h"

#include "../checks.h"
#include "../dct_matrix.h"
#include "multiversion.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

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

// Items (images) per parallel chunk: at least ~2^20 multiply-adds (~0.1 ms) per chunk, so
// that small batches run inline: waking OpenMP threads costs more than they save there, and
// stalls for milliseconds when the other cores are busy.
int64_t block_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, work_per_item));
}

}  // namespace

// Even/odd (butterfly) factors of C_n, from C_n[k, n-1-i] = (-1)^k C_n[k, i]: with m = n / 2 and
// ms = n - m, E (ms x ms) E[i, e] = C[2e, i], O (m x m) O[i, o] = C[2o+1, i], and their
// transposes. A length-n transform then costs ms^2 + m^2 ~ n^2 / 2 multiply-adds instead of n^2.
template <typename T>
struct Butterfly {
  int64_t n, m, ms;
  std::vector<T> e, o, et, ot;
  Butterfly(const T* c, int64_t n_) : n(n_), m(n_ / 2), ms(n_ - n_ / 2) {
    e.resize(ms * ms);
    et.resize(ms * ms);
    o.resize(m * m);
    ot.resize(m * m);
    for (int64_t i = 0; i < ms; ++i)
      for (int64_t k = 0; k < ms; ++k) e[i * ms + k] = et[k * ms + i] = c[(2 * k) * n + i];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t k = 0; k < m; ++k) o[i * m + k] = ot[k * m + i] = c[(2 * k + 1) * n + i];
  }
};

// Rows of x (rows x W, row stride W): sums s[i] = x[i] + x[n-1-i] (ms rows; the middle row
// copied when n is odd) and differences d[i] = x[i] - x[n-1-i] (m rows), along dimension 0.
template <typename T>
void fold_rows(const T* x, int64_t n, int64_t W, T* s, T* d) {
  const int64_t m = n / 2;
  for (int64_t i = 0; i < m; ++i) {
    const T* a = x + i * W;
    const T* b = x + (n - 1 - i) * W;
    for (int64_t w = 0; w < W; ++w) {
      s[i * W + w] = a[w] + b[w];
      d[i * W + w] = a[w] - b[w];
    }
  }
  if (n % 2) std::memcpy(s + m * W, x + m * W, sizeof(T) * W);
}

// The same along dimension 1 of x (H x n): s (H x ms), d (H x m).
template <typename T>
void fold_cols(const T* x, int64_t H, int64_t n, T* s, T* d) {
  const int64_t m = n / 2, ms = n - m;
  for (int64_t h = 0; h < H; ++h) {
    const T* r = x + h * n;
    for (int64_t i = 0; i < m; ++i) {
      s[h * ms + i] = r[i] + r[n - 1 - i];
      d[h * m + i] = r[i] - r[n - 1 - i];
    }
    if (n % 2) s[h * ms + m] = r[m];
  }
}

// Forward 2-D DCT of one H x W image: rows (dimension 0) then columns, each through its butterfly.
// t1, t2: scratch of H * W each.
template <typename T>
void dct2_image(const T* x, T* out, const Butterfly<T>& bh, const Butterfly<T>& bw, int64_t H,
                int64_t W, T* t1, T* t2) {
  // rows: Z[2e] = Et_H s, Z[2o+1] = Ot_H d (written interleaved, row stride 2W)
  T* s = t1;
  T* d = t1 + bh.ms * W;
  fold_rows(x, H, W, s, d);
  small_gemm(t2, 2 * W, bh.et.data(), bh.ms, s, W, bh.ms, bh.ms, W);
  small_gemm(t2 + W, 2 * W, bh.ot.data(), bh.m, d, W, bh.m, bh.m, W);
  // columns: [S E_W | D O_W] (even frequencies, then odd), then interleaved into out
  T* sc = t1;
  T* dc = t1 + H * bw.ms;
  fold_cols(t2, H, W, sc, dc);
  small_gemm(t2, W, sc, bw.ms, bw.e.data(), bw.ms, H, bw.ms, bw.ms);
  small_gemm(t2 + bw.ms, W, dc, bw.m, bw.o.data(), bw.m, H, bw.m, bw.m);
  for (int64_t h = 0; h < H; ++h) {
    const T* u = t2 + h * W;
    T* o = out + h * W;
    for (int64_t k = 0; k < bw.ms; ++k) o[2 * k] = u[k];
    for (int64_t k = 0; k < bw.m; ++k) o[2 * k + 1] = u[bw.ms + k];
  }
}

// Inverse 2-D DCT of one H x W coefficient image (the transpose of dct2_image).
template <typename T>
void idct2_image(const T* z, T* out, const Butterfly<T>& bh, const Butterfly<T>& bw, int64_t H,
                 int64_t W, T* t1, T* t2) {
  // rows: P = E_H Z[even rows], Q = O_H Z[odd rows]; Y[i] = P + Q, Y[H-1-i] = P - Q
  T* p = t1;
  T* q = t1 + bh.ms * W;
  small_gemm(p, W, bh.e.data(), bh.ms, z, 2 * W, bh.ms, bh.ms, W);
  small_gemm(q, W, bh.o.data(), bh.m, z + W, 2 * W, bh.m, bh.m, W);
  // Y, with its columns de-interleaved (even frequencies, then odd), into t2
  for (int64_t i = 0; i < bh.ms; ++i) {
    const bool mid = i == bh.m;  // the middle row of an odd H has no odd part
    T* ya = t2 + i * W;
    T* yb = t2 + (H - 1 - i) * W;
    const T* pr = p + i * W;
    const T* qr = q + i * W;
    for (int64_t k = 0; k < bw.ms; ++k) {
      const T pv = pr[2 * k], qv = mid ? T(0) : qr[2 * k];
      ya[k] = pv + qv;
      if (!mid) yb[k] = pv - qv;
    }
    for (int64_t k = 0; k < bw.m; ++k) {
      const T pv = pr[2 * k + 1], qv = mid ? T(0) : qr[2 * k + 1];
      ya[bw.ms + k] = pv + qv;
      if (!mid) yb[bw.ms + k] = pv - qv;
    }
  }
  // columns: P2 = Yeven Et_W (H x ms), Q2 = Yodd Ot_W (H x m); X[:, i] = P2 + Q2, X[:, W-1-i] = P2 - Q2
  T* p2 = t1;
  T* q2 = t1 + H * bw.ms;
  small_gemm(p2, bw.ms, t2, W, bw.et.data(), bw.ms, H, bw.ms, bw.ms);
  small_gemm(q2, bw.m, t2 + bw.ms, W, bw.ot.data(), bw.m, H, bw.m, bw.m);
  for (int64_t h = 0; h < H; ++h) {
    const T* pr = p2 + h * bw.ms;
    const T* qr = q2 + h * bw.m;
    T* o = out + h * W;
    for (int64_t i = 0; i < bw.m; ++i) {
      o[i] = pr[i] + qr[i];
      o[W - 1 - i] = pr[i] - qr[i];
    }
    if (W % 2) o[bw.m] = pr[bw.m];
  }
}

// Plain form for one image: T = X M_W (columns), Y = M_H T (rows); forward M_W = C_W^T,
// M_H = C_H; inverse M_W = C_W, M_H = C_H^T. t1: scratch of H * W.
template <typename T>
void dct2_image_plain(const T* x, T* out, const T* mh, const T* mw, int64_t H, int64_t W, T* t1) {
  small_gemm(t1, W, x, W, mw, W, H, W, W);
  small_gemm(out, W, mh, H, t1, W, H, H, W);
}

// Images at least this wide and high use the butterfly form (fewer multiply-adds, a few extra
// passes); smaller ones the plain form (measured faster at 28 x 28 and 32 x 32).
constexpr int64_t kButterflyMinSize = 64;

// dct2 / idct2 of every H x W image, parallel over images.
static at::Tensor dct2_direct(const at::Tensor& x, bool inverse) {
  const int64_t H = x.size(-2), W = x.size(-1);
  const int64_t B = x.numel() / (H * W);
  const bool butterfly = H >= kButterflyMinSize && W >= kButterflyMinSize;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dct2_cpu", [&] {
    const at::ScalarType dt = x.scalar_type();
    // Hold the cached matrices (a later cache miss may evict them from the cache).
    const at::Tensor ch_t = cpu_matrix(H, dt, false), cw_t = cpu_matrix(W, dt, false);
    const at::Tensor cht_t = cpu_matrix(H, dt, true), cwt_t = cpu_matrix(W, dt, true);
    const scalar_t* ch = ch_t.const_data_ptr<scalar_t>();
    const scalar_t* cw = cw_t.const_data_ptr<scalar_t>();
    // plain form: forward M_W = C_W^T, M_H = C_H; inverse M_W = C_W, M_H = C_H^T
    const scalar_t* mw = inverse ? cw : cwt_t.const_data_ptr<scalar_t>();
    const scalar_t* mh = inverse ? cht_t.const_data_ptr<scalar_t>() : ch;
    const Butterfly<scalar_t> bh(ch, butterfly ? H : 0), bw(cw, butterfly ? W : 0);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const int64_t work = butterfly ? H * W * (H + W) / 2 : H * W * (H + W);
    at::parallel_for(0, B, block_grain(work), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> t1(static_cast<size_t>(H * W));
      std::vector<scalar_t> t2(static_cast<size_t>(butterfly ? H * W : 0));
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* xi = xp + b * H * W;
        scalar_t* oi = op_ + b * H * W;
        if (!butterfly) {
          dct2_image_plain(xi, oi, mh, mw, H, W, t1.data());
        } else if (inverse) {
          idct2_image(xi, oi, bh, bw, H, W, t1.data(), t2.data());
        } else {
          dct2_image(xi, oi, bh, bw, H, W, t1.data(), t2.data());
        }
      }
    });
  });
  return out;
}

static at::Tensor dct2_cpu_any(const at::Tensor& x, bool inverse) {
  check_dct2_args(inverse ? "idct2" : "dct2", x);
  // Empty input (a zero batch, H = 0 or W = 0): an empty result of the same shape, as on CUDA
  // and in the twins.
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());
  return dct2_direct(x, inverse);
}

at::Tensor dct2_cpu(const at::Tensor& x) { return dct2_cpu_any(x, false); }
at::Tensor idct2_cpu(const at::Tensor& x) { return dct2_cpu_any(x, true); }

at::Tensor dct_block_analysis_cpu(const at::Tensor& x, const at::Tensor& row0,
                                  const at::Tensor& col0, int64_t kh, int64_t kw) {
  check_analysis_args(x, row0, col0, kh, kw);
  check_origin_values_cpu("dct_block_analysis", row0, col0, kh, kw, x.size(2), x.size(3));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({N, C, kh, kw}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor r0 = row0.contiguous(), c0 = col0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dct_block_analysis_cpu", [&] {
    // A_h = C_H[row0 : row0 + kh] (kh x H), A_w^T = C_W^T[:, col0 : col0 + kw] (W x kw).
    const at::Tensor ch_t = cpu_matrix(H, x.scalar_type(), false);  // held: see dct2_direct
    const at::Tensor cwt_t = cpu_matrix(W, x.scalar_type(), true);
    const scalar_t* ch = ch_t.const_data_ptr<scalar_t>();
    const scalar_t* cwt = cwt_t.const_data_ptr<scalar_t>();
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
  check_synthesis_args(coeffs, row0, col0, H, W);
  check_origin_values_cpu("dct_block_synthesis", row0, col0, coeffs.size(2), coeffs.size(3), H, W);
  const int64_t N = coeffs.size(0), C = coeffs.size(1);
  const int64_t kh = coeffs.size(2), kw = coeffs.size(3);
  at::Tensor out = at::empty({N, C, H, W}, coeffs.options());
  if (out.numel() == 0) return out;
  const at::Tensor cc = coeffs.contiguous();
  const at::Tensor r0 = row0.contiguous(), c0 = col0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "dct_block_synthesis_cpu", [&] {
    // A_w = C_W[col0 : col0 + kw] (kw x W), A_h^T = C_H^T[:, row0 : row0 + kh] (H x kh).
    const at::Tensor cw_t = cpu_matrix(W, coeffs.scalar_type(), false);  // held: see dct2_direct
    const at::Tensor cht_t = cpu_matrix(H, coeffs.scalar_type(), true);
    const scalar_t* cw = cw_t.const_data_ptr<scalar_t>();
    const scalar_t* cht = cht_t.const_data_ptr<scalar_t>();
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
}
