// Host-side helpers shared by the CPU and CUDA implementations of the pyboundary ops:
// argument validation (TORCH_CHECK_* messages naming the argument and the bad value, raised in
// Python as ValueError / TypeError), the DCT-matrix cache, and the op declarations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <string>
#include <tuple>

namespace pyboundary {

// ---- validation -------------------------------------------------------------------------
// Python spelling of a dtype ("torch.float32"), for messages.
std::string dtype_name(at::ScalarType t);
// name is "<op>: <argument>".
void check_float(const char* op, const char* name, const at::Tensor& t);
// Rank check: t must have exactly (or at least, if at_least) `dim` dimensions.
void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                const char* shape, bool at_least);
// Per-sample block origins row0/col0: int64, shape (n,), on `device`, block (kh, kw) inside
// the H x W grid. Reads the origins on the host (one device-to-host copy for CUDA inputs).
void check_origins(const char* op, int64_t n, const at::Tensor& row0, const at::Tensor& col0,
                   const c10::Device& device, int64_t kh, int64_t kw, int64_t H, int64_t W);
// dct_block_analysis arguments: x float (N, C, H, W), origins of (kh, kw) blocks inside H x W.
void check_analysis_args(const at::Tensor& x, const at::Tensor& row0, const at::Tensor& col0,
                         int64_t kh, int64_t kw);
// dct_block_synthesis arguments: coeffs float (N, C, kh, kw), H, W >= 1, origins of the
// (kh, kw) blocks inside H x W.
void check_synthesis_args(const at::Tensor& coeffs, const at::Tensor& row0,
                          const at::Tensor& col0, int64_t H, int64_t W);
// deepfool_select arguments; returns true for p = inf, false for p = 2.
bool check_select_args(const at::Tensor& gap, const at::Tensor& grad_gap, double p, double eps);
// deepfool_select buffers for checked arguments gap (N, k), grad_gap (N, k, M): the inputs made
// contiguous and the uninitialised outputs step (N, M) (grad_gap's options), index (N,) int64
// and dist (N,) (gap's options).
struct SelectBuffers {
  at::Tensor gap, grad_gap;
  at::Tensor step, index, dist;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {step, index, dist}; }
};
SelectBuffers select_buffers(const at::Tensor& gap, const at::Tensor& grad_gap);

// ---- DCT matrices -----------------------------------------------------------------------
// Orthonormal DCT-II matrix C_n (n x n, row k = frequency) or its transpose, contiguous, of the
// given dtype on the given device. Built in double from math::dct_coef and rounded once, then
// kept in a small mutex-protected cache (never handed to callers who could modify it: the ops
// only read it). `build` makes the matrix for a device type the cache does not know how to fill.
using DctBuilder = std::function<at::Tensor(int64_t n, at::ScalarType dtype, c10::Device device,
                                            bool transposed)>;
at::Tensor dct_matrix_cached(int64_t n, at::ScalarType dtype, c10::Device device,
                             bool transposed, const DctBuilder& build);
// CPU builder (double computation, cast to dtype).
at::Tensor build_dct_matrix_cpu(int64_t n, at::ScalarType dtype, bool transposed);

// ---- ops (shared by CPU and CUDA: matmul with the cached matrices) ------------------------
at::Tensor dct2_impl(const at::Tensor& x, bool inverse, const DctBuilder& build);

// ---- CPU kernels ----
at::Tensor dct2_cpu(const at::Tensor& x);
at::Tensor idct2_cpu(const at::Tensor& x);
at::Tensor dct_block_analysis_cpu(const at::Tensor& x, const at::Tensor& row0,
                                  const at::Tensor& col0, int64_t kh, int64_t kw);
at::Tensor dct_block_synthesis_cpu(const at::Tensor& coeffs, const at::Tensor& row0,
                                   const at::Tensor& col0, int64_t H, int64_t W);
std::tuple<at::Tensor, at::Tensor, at::Tensor> deepfool_select_cpu(const at::Tensor& gap,
                                                                   const at::Tensor& grad_gap,
                                                                   double p, double eps);

// ---- CUDA kernels (csrc/cuda, compiled only when the CUDA kernels are built) ----
at::Tensor dct2_cuda(const at::Tensor& x);
at::Tensor idct2_cuda(const at::Tensor& x);
at::Tensor dct_block_analysis_cuda(const at::Tensor& x, const at::Tensor& row0,
                                   const at::Tensor& col0, int64_t kh, int64_t kw);
at::Tensor dct_block_synthesis_cuda(const at::Tensor& coeffs, const at::Tensor& row0,
                                    const at::Tensor& col0, int64_t H, int64_t W);
std::tuple<at::Tensor, at::Tensor, at::Tensor> deepfool_select_cuda(const at::Tensor& gap,
                                                                    const at::Tensor& grad_gap,
                                                                    double p, double eps);

}  // namespace pyboundary
