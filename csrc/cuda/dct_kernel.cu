// CUDA kernels of the DCT ops (dct2, idct2, dct_block_analysis, dct_block_synthesis) and their
// CUDA registration.
//
// dct2/idct2: two batched products with the cached DCT matrices, T = X M_W then Y = M_H T, in
// an own shared-memory tiled kernel (plain multiply-adds, accumulated in at::acc_type): the
// result does not depend on global matmul settings such as TF32
// (torch.backends.cuda.matmul.allow_tf32, torch.set_float32_matmul_precision), which would
// change the accuracy of a cuBLAS product to ~1e-3.
// Block ops: the separable two-stage contraction (O(N C kh H W)), one thread per output entry
// of each stage, coalesced along W. The block origins are checked inside the kernels (no copy
// to the host): an out-of-range origin triggers a device-side assert and is never dereferenced.
// Empty inputs return before any matrix is built or kernel launched (a zero-sized grid is an
// invalid launch).
#include "cuda_kernels.h"

#include "../checks.h"
#include "../dct_matrix.h"
#include "../pyboundary_math.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace pyboundary {

namespace {

constexpr int kThreads = 256;

// Blocks of kThreads covering n >= 1 threads.
unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "pyboundary: ", n,
              " elements exceed the CUDA grid limit");
  return static_cast<unsigned int>(blocks);
}

template <typename scalar_t>
__global__ void fill_dct_kernel(scalar_t* __restrict__ out, int64_t n, bool transposed) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * n) return;
  const int64_t r = idx / n, c = idx % n;
  // row-major entry (r, c): C_n[r, c], or C_n[c, r] for the transpose.
  const double v = transposed ? math::dct_coef(n, c, r) : math::dct_coef(n, r, c);
  out[idx] = static_cast<scalar_t>(v);
}

at::Tensor cuda_builder(int64_t n, at::ScalarType dtype, c10::Device device, bool transposed) {
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor m = at::empty({n, n}, at::TensorOptions().dtype(dtype).device(device));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "fill_dct_cuda", [&] {
    fill_dct_kernel<scalar_t><<<blocks_for(n * n), kThreads, 0, stream>>>(
        m.mutable_data_ptr<scalar_t>(), n, transposed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The cached matrix may later be read from other streams: finish it now. This is the one
  // synchronisation of the CUDA ops, once per cache miss (first use of a size, dtype and
  // device); warm the cache up before capturing a CUDA graph.
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return m;
}

// The cached matrix, recorded as used on `stream` (csrc/dct_matrix.h: lifetime).
at::Tensor cuda_matrix(int64_t n, at::ScalarType dtype, c10::Device device, bool transposed,
                       const c10::cuda::CUDAStream& stream) {
  at::Tensor m = dct_matrix_cached(n, dtype, device, transposed, cuda_builder);
  c10::cuda::CUDACachingAllocator::recordStream(m.storage().data_ptr(), stream);
  return m;
}

// ---- dct2 / idct2: batched tiled product ---------------------------------------------------

constexpr int kTile = 32;                                    // output tile and K-slab
constexpr int kSub = 4;                                      // outputs per thread: kSub x kSub
constexpr int kGemmThreads = (kTile / kSub) * (kTile / kSub);  // 64

// c[i] (R x Nc) = a[i] (R x K) @ b[i] (K x Nc) for every batch item i; row-major contiguous
// matrices, a_batch / b_batch the batch strides (0: one matrix shared by the batch), c's batch
// stride R * Nc. Grid: x = batch * col_tiles, y = row tiles; kGemmThreads threads per block.
template <typename scalar_t>
__global__ void batched_gemm_kernel(const scalar_t* __restrict__ a, int64_t a_batch,
                                    const scalar_t* __restrict__ b, int64_t b_batch,
                                    scalar_t* __restrict__ c, int64_t R, int64_t K, int64_t Nc,
                                    int64_t col_tiles) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ scalar_t as[kTile][kTile + 1];
  __shared__ scalar_t bs[kTile][kTile + 1];
  const int64_t item = blockIdx.x / col_tiles;
  const int64_t col_base = (blockIdx.x % col_tiles) * kTile;
  const int64_t row_base = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tid = threadIdx.x;
  const int tr = (tid / (kTile / kSub)) * kSub;  // first tile row / column of this thread
  const int tc = (tid % (kTile / kSub)) * kSub;
  a += item * a_batch;
  b += item * b_batch;
  c += item * R * Nc;
  acc_t acc[kSub][kSub];
  for (int u = 0; u < kSub; ++u)
    for (int v = 0; v < kSub; ++v) acc[u][v] = acc_t(0);
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    for (int e = tid; e < kTile * kTile; e += kGemmThreads) {
      const int r = e / kTile, q = e % kTile;
      const int64_t ar = row_base + r, ak = k0 + q;
      as[r][q] = (ar < R && ak < K) ? a[ar * K + ak] : scalar_t(0);
      const int64_t bk = k0 + r, bc = col_base + q;
      bs[r][q] = (bk < K && bc < Nc) ? b[bk * Nc + bc] : scalar_t(0);
    }
    __syncthreads();
    for (int j = 0; j < kTile; ++j) {
      acc_t av[kSub], bv[kSub];
      for (int u = 0; u < kSub; ++u) av[u] = static_cast<acc_t>(as[tr + u][j]);
      for (int v = 0; v < kSub; ++v) bv[v] = static_cast<acc_t>(bs[j][tc + v]);
      for (int u = 0; u < kSub; ++u)
        for (int v = 0; v < kSub; ++v) acc[u][v] += av[u] * bv[v];
    }
    __syncthreads();
  }
  for (int u = 0; u < kSub; ++u) {
    const int64_t row = row_base + tr + u;
    if (row >= R) break;
    for (int v = 0; v < kSub; ++v) {
      const int64_t col = col_base + tc + v;
      if (col < Nc) c[row * Nc + col] = static_cast<scalar_t>(acc[u][v]);
    }
  }
}

template <typename scalar_t>
void launch_batched_gemm(const scalar_t* a, int64_t a_batch, const scalar_t* b, int64_t b_batch,
                         scalar_t* c, int64_t batch, int64_t R, int64_t K, int64_t Nc,
                         cudaStream_t stream) {
  const int64_t col_tiles = (Nc + kTile - 1) / kTile;
  const int64_t row_tiles = (R + kTile - 1) / kTile;
  TORCH_CHECK(batch * col_tiles <= std::numeric_limits<int>::max() && row_tiles <= 65535,
              "pyboundary: dct2 of ", batch, " images of ", R, " x ", Nc,
              " exceeds the CUDA grid limits");
  const dim3 grid(static_cast<unsigned int>(batch * col_tiles),
                  static_cast<unsigned int>(row_tiles));
  batched_gemm_kernel<scalar_t><<<grid, kGemmThreads, 0, stream>>>(a, a_batch, b, b_batch, c, R,
                                                                   K, Nc, col_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- block ops ------------------------------------------------------------------------------

// out[i, a, w] = sum_j coef_i[a, j] * in[i, j, w], where coef_i is a (rows x J) window of C_H
// (H x H). Used for both stages that run along H (analysis stage 1, synthesis stage 2).
//   analysis stage 1 (rows = kh, J = H):  coef_i[a, h] = C_H[row0[n] + a, h]
//   synthesis stage 2 (rows = H, J = kh): coef_i[h, a] = C_H[row0[n] + a, h]   (transposed)
template <typename scalar_t>
__global__ void rows_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ mat,
                            const int64_t* __restrict__ origin, scalar_t* __restrict__ out,
                            int64_t items, int64_t C, int64_t rows, int64_t J, int64_t W,
                            int64_t H, bool transposed) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= items * rows * W) return;
  const int64_t w = idx % W;
  const int64_t a = (idx / W) % rows;
  const int64_t item = idx / (W * rows);
  const int64_t o = origin[item / C];
  const bool ok = math::block_origin_ok(o, transposed ? J : rows, H);
  CUDA_KERNEL_ASSERT_MSG(ok, "pyboundary dct block op: row0 out of range");
  if (!ok) {
    out[idx] = static_cast<scalar_t>(NAN);
    return;
  }
  const scalar_t* x = in + item * J * W + w;
  acc_t acc = 0;
  if (!transposed) {
    const scalar_t* m = mat + (o + a) * H;  // row o + a of C_H, J = H entries
    for (int64_t j = 0; j < J; ++j) acc += static_cast<acc_t>(m[j]) * x[j * W];
  } else {
    const scalar_t* m = mat + o * H + a;  // C_H[o + j, a] for j < J = kh
    for (int64_t j = 0; j < J; ++j) acc += static_cast<acc_t>(m[j * H]) * x[j * W];
  }
  out[idx] = static_cast<scalar_t>(acc);
}

// Analysis stage 2: out[i, a, b] = sum_w t[i, a, w] * C_W[col0[n] + b, w].
template <typename scalar_t>
__global__ void cols_analysis_kernel(const scalar_t* __restrict__ t,
                                     const scalar_t* __restrict__ cw,
                                     const int64_t* __restrict__ col0, scalar_t* __restrict__ out,
                                     int64_t items, int64_t C, int64_t kh, int64_t kw, int64_t W) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= items * kh * kw) return;
  const int64_t b = idx % kw;
  const int64_t row = idx / kw;  // item * kh + a
  const int64_t item = row / kh;
  const int64_t o = col0[item / C];
  const bool ok = math::block_origin_ok(o, kw, W);
  CUDA_KERNEL_ASSERT_MSG(ok, "pyboundary dct_block_analysis: col0 out of range");
  if (!ok) {
    out[idx] = static_cast<scalar_t>(NAN);
    return;
  }
  const scalar_t* tr = t + row * W;
  const scalar_t* m = cw + (o + b) * W;
  acc_t acc = 0;
  for (int64_t w = 0; w < W; ++w) acc += static_cast<acc_t>(tr[w]) * m[w];
  out[idx] = static_cast<scalar_t>(acc);
}

// Synthesis stage 1: u[i, a, w] = sum_b coeffs[i, a, b] * C_W[col0[n] + b, w].
template <typename scalar_t>
__global__ void cols_synthesis_kernel(const scalar_t* __restrict__ coeffs,
                                      const scalar_t* __restrict__ cw,
                                      const int64_t* __restrict__ col0, scalar_t* __restrict__ u,
                                      int64_t items, int64_t C, int64_t kh, int64_t kw,
                                      int64_t W) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= items * kh * W) return;
  const int64_t w = idx % W;
  const int64_t row = idx / W;  // item * kh + a
  const int64_t item = row / kh;
  const int64_t o = col0[item / C];
  const bool ok = math::block_origin_ok(o, kw, W);
  CUDA_KERNEL_ASSERT_MSG(ok, "pyboundary dct_block_synthesis: col0 out of range");
  if (!ok) {
    u[idx] = static_cast<scalar_t>(NAN);
    return;
  }
  const scalar_t* cr = coeffs + row * kw;
  const scalar_t* m = cw + o * W + w;
  acc_t acc = 0;
  for (int64_t b = 0; b < kw; ++b) acc += static_cast<acc_t>(cr[b]) * m[b * W];
  u[idx] = static_cast<scalar_t>(acc);
}

at::Tensor dct2_cuda_any(const at::Tensor& x, bool inverse) {
  check_dct2_args(inverse ? "idct2" : "dct2", x);
  // Empty input (a zero batch, H = 0 or W = 0): an empty result of the same shape, as on CPU
  // and in the twins; no matrix (n = 0) is built and no kernel launched.
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t H = x.size(-2), W = x.size(-1);
  const int64_t B = x.numel() / (H * W);
  auto stream = at::cuda::getCurrentCUDAStream();
  // forward: T = X C_W^T, Y = C_H T;  inverse: T = X C_W, Y = C_H^T T.
  const at::Tensor right = cuda_matrix(W, x.scalar_type(), x.device(), !inverse, stream);
  const at::Tensor left = cuda_matrix(H, x.scalar_type(), x.device(), inverse, stream);
  const at::Tensor xc = x.contiguous();
  at::Tensor t = at::empty({B, H, W}, x.options());
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dct2_cuda", [&] {
    launch_batched_gemm<scalar_t>(xc.const_data_ptr<scalar_t>(), H * W,
                                  right.const_data_ptr<scalar_t>(), 0,
                                  t.mutable_data_ptr<scalar_t>(), B, H, W, W, stream);
    launch_batched_gemm<scalar_t>(left.const_data_ptr<scalar_t>(), 0,
                                  t.const_data_ptr<scalar_t>(), H * W,
                                  out.mutable_data_ptr<scalar_t>(), B, H, H, W, stream);
  });
  return out;
}

}  // namespace

at::Tensor dct2_cuda(const at::Tensor& x) { return dct2_cuda_any(x, false); }
at::Tensor idct2_cuda(const at::Tensor& x) { return dct2_cuda_any(x, true); }

at::Tensor dct_block_analysis_cuda(const at::Tensor& x, const at::Tensor& row0,
                                   const at::Tensor& col0, int64_t kh, int64_t kw) {
  check_analysis_args(x, row0, col0, kh, kw);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({N, C, kh, kw}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor r0 = row0.contiguous(), c0 = col0.contiguous();
  at::Tensor tmp = at::empty({N, C, kh, W}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor ch = cuda_matrix(H, x.scalar_type(), x.device(), false, stream);
  const at::Tensor cw = cuda_matrix(W, x.scalar_type(), x.device(), false, stream);
  const int64_t items = N * C;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dct_block_analysis_cuda", [&] {
    rows_kernel<scalar_t><<<blocks_for(items * kh * W), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), ch.const_data_ptr<scalar_t>(),
        r0.const_data_ptr<int64_t>(), tmp.mutable_data_ptr<scalar_t>(), items, C, kh, H, W, H,
        false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cols_analysis_kernel<scalar_t><<<blocks_for(items * kh * kw), kThreads, 0, stream>>>(
        tmp.const_data_ptr<scalar_t>(), cw.const_data_ptr<scalar_t>(),
        c0.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), items, C, kh, kw, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor dct_block_synthesis_cuda(const at::Tensor& coeffs, const at::Tensor& row0,
                                    const at::Tensor& col0, int64_t H, int64_t W) {
  check_synthesis_args(coeffs, row0, col0, H, W);
  const int64_t N = coeffs.size(0), C = coeffs.size(1);
  const int64_t kh = coeffs.size(2), kw = coeffs.size(3);
  const c10::cuda::CUDAGuard guard(coeffs.device());
  at::Tensor out = at::empty({N, C, H, W}, coeffs.options());
  if (out.numel() == 0) return out;
  const at::Tensor cc = coeffs.contiguous();
  const at::Tensor r0 = row0.contiguous(), c0 = col0.contiguous();
  at::Tensor tmp = at::empty({N, C, kh, W}, coeffs.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor ch = cuda_matrix(H, coeffs.scalar_type(), coeffs.device(), false, stream);
  const at::Tensor cw = cuda_matrix(W, coeffs.scalar_type(), coeffs.device(), false, stream);
  const int64_t items = N * C;
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "dct_block_synthesis_cuda", [&] {
    cols_synthesis_kernel<scalar_t><<<blocks_for(items * kh * W), kThreads, 0, stream>>>(
        cc.const_data_ptr<scalar_t>(), cw.const_data_ptr<scalar_t>(),
        c0.const_data_ptr<int64_t>(), tmp.mutable_data_ptr<scalar_t>(), items, C, kh, kw, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rows_kernel<scalar_t><<<blocks_for(items * H * W), kThreads, 0, stream>>>(
        tmp.const_data_ptr<scalar_t>(), ch.const_data_ptr<scalar_t>(),
        r0.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), items, C, H, kh, W, H,
        true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pyboundary

TORCH_LIBRARY_IMPL(pyboundary, CUDA, m) {
  m.impl("dct2", &pyboundary::dct2_cuda);
  m.impl("idct2", &pyboundary::idct2_cuda);
  m.impl("dct_block_analysis", &pyboundary::dct_block_analysis_cuda);
  m.impl("dct_block_synthesis", &pyboundary::dct_block_synthesis_cuda);
}
