// Argument validation shared by the CPU and CUDA kernels of the pyboundary ops. Messages name
// the op, the argument and the value seen; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE raise
// ValueError / TypeError in Python, as the pure-torch twins do.
//
// No check here reads tensor *values* of a CUDA tensor: the CUDA ops validate metadata on the
// host and the block origins inside their kernels, so that a call makes no device-to-host copy
// (no synchronisation; CUDA-graph capturable). check_origin_values_cpu is for CPU tensors only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace pyboundary {

// Python spelling of a dtype ("torch.float32"), for messages.
std::string dtype_name(at::ScalarType t);

// t is a defined float32/float64 tensor; name is the argument's name, op the op's.
void check_float(const char* op, const char* name, const at::Tensor& t);

// Rank check: t must have exactly (or at least, if at_least) `dim` dimensions.
void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                const char* shape, bool at_least);

// Metadata of the per-sample block origins row0/col0: int64, shape (n,), on `device`; block
// sizes 1 <= kh <= H, 1 <= kw <= W. Reads no values.
void check_origin_tensors(const char* op, int64_t n, const at::Tensor& row0,
                          const at::Tensor& col0, const c10::Device& device, int64_t kh,
                          int64_t kw, int64_t H, int64_t W);

// Values of CPU origins (after check_origin_tensors): every block inside the H x W grid,
// 0 <= row0 <= H - kh, 0 <= col0 <= W - kw. CPU tensors only (reads them on the host).
void check_origin_values_cpu(const char* op, const at::Tensor& row0, const at::Tensor& col0,
                             int64_t kh, int64_t kw, int64_t H, int64_t W);

// dct2/idct2 argument: x float (..., H, W).
void check_dct2_args(const char* op, const at::Tensor& x);

// dct_block_analysis metadata: x float (N, C, H, W), origins of (kh, kw) blocks (values not read).
void check_analysis_args(const at::Tensor& x, const at::Tensor& row0, const at::Tensor& col0,
                         int64_t kh, int64_t kw);

// dct_block_synthesis metadata: coeffs float (N, C, kh, kw), H, W >= 1, origins of (kh, kw)
// blocks (values not read).
void check_synthesis_args(const at::Tensor& coeffs, const at::Tensor& row0,
                          const at::Tensor& col0, int64_t H, int64_t W);

// deepfool_select arguments, checked, with the inputs made contiguous and the uninitialised
// outputs step (N, M) (grad_gap's options), index (N,) int64 and dist (N,) (gap's options).
struct SelectArgs {
  bool p_inf;  // p = inf (dual norm 1); false: p = 2
  at::Tensor gap, grad_gap;
  at::Tensor step, index, dist;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {step, index, dist}; }
};
SelectArgs check_select_args(const at::Tensor& gap, const at::Tensor& grad_gap, double p,
                             double eps);

}  // namespace pyboundary
