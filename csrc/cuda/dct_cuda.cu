// CUDA kernels of the DCT ops. dct2/idct2: DCT matrices filled on the device from
// math::dct_coef (cached), then cuBLAS through ATen matmul. Block ops: the separable two-stage
// contraction (O(N C kh H W)), one thread per output entry of each stage, coalesced along W.
#include "../common.h"
#include "../pyboundary_math.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace pyboundary {

namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
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
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The cached matrix may later be read from other streams: finish it now (once per cache miss).
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return m;
}

at::Tensor cuda_matrix(int64_t n, at::ScalarType dtype, c10::Device device, bool transposed) {
  return dct_matrix_cached(n, dtype, device, transposed, cuda_builder);
}

// out[i, a, w] = sum_j coef_i[a, j] * in[i, j, w], where coef_i is a (rows x J) window of a DCT
// matrix. Used for both stages that run along H (analysis stage 1, synthesis stage 2).
//   analysis stage 1: coef_i[a, h] = C_H[row0[n] + a, h]        (mat, row offset, ld = H)
//   synthesis stage 2: coef_i[h, a] = C_H[row0[n] + a, h]       (transposed access)
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
  const scalar_t* tr = t + row * W;
  const scalar_t* m = cw + (col0[item / C] + b) * W;
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
  const scalar_t* cr = coeffs + row * kw;
  const scalar_t* m = cw + col0[item / C] * W + w;
  acc_t acc = 0;
  for (int64_t b = 0; b < kw; ++b) acc += static_cast<acc_t>(cr[b]) * m[b * W];
  u[idx] = static_cast<scalar_t>(acc);
}

}  // namespace

at::Tensor dct2_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  return dct2_impl(x, false, cuda_builder);
}

at::Tensor idct2_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  return dct2_impl(x, true, cuda_builder);
}

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
  const at::Tensor ch = cuda_matrix(H, x.scalar_type(), x.device(), false);
  const at::Tensor cw = cuda_matrix(W, x.scalar_type(), x.device(), false);
  auto stream = at::cuda::getCurrentCUDAStream();
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
  const at::Tensor ch = cuda_matrix(H, coeffs.scalar_type(), coeffs.device(), false);
  const at::Tensor cw = cuda_matrix(W, coeffs.scalar_type(), coeffs.device(), false);
  auto stream = at::cuda::getCurrentCUDAStream();
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
