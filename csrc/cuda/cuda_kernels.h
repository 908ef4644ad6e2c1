// CUDA kernels of the pyboundary ops (registered for the CUDA dispatch key by the file that
// defines them: dct_kernel.cu, select_kernel.cu; compiled only when the CUDA kernels are
// built). Contracts: pyboundary/ops (the twins). None of them copies data to the host: block
// origins are validated inside the kernels (an out-of-range origin triggers a device-side
// assert, reported at the next synchronisation, and is never dereferenced).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace pyboundary {

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
