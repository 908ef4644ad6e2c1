// The orthonormal DCT-II matrices the kernels multiply with, built from math::dct_coef and kept
// in a small process-wide cache keyed by (n, dtype, device, transposed).
//
// Lifetime: the ops only read a cached matrix and hold a reference while they launch work on
// it. When the cache is full it drops every entry; a matrix still referenced by a running op
// stays alive until that op returns. CUDA kernels run asynchronously after their op returned,
// so the CUDA ops record the current stream on every matrix they read
// (CUDACachingAllocator::recordStream): its memory is then not reused before the work queued on
// that stream has finished, even when the stream differs from the one the matrix was made on.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>

namespace pyboundary {

// Makes C_n (row k = frequency) or its transpose, n >= 1, contiguous, dtype on device.
using DctBuilder = std::function<at::Tensor(int64_t n, at::ScalarType dtype, c10::Device device,
                                            bool transposed)>;

// The cached matrix (never modified by callers); `build` fills a missing entry (called outside
// the cache lock; of two concurrent misses the first stored wins). Requires n >= 1.
at::Tensor dct_matrix_cached(int64_t n, at::ScalarType dtype, c10::Device device,
                             bool transposed, const DctBuilder& build);

// CPU builder: computed in double from math::dct_coef, rounded once to dtype.
at::Tensor build_dct_matrix_cpu(int64_t n, at::ScalarType dtype, bool transposed);

}  // namespace pyboundary
