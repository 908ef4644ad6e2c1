// Emulation shim (tests/cuda_emu) for c10/cuda/CUDACachingAllocator.h: recordStream is counted
// (the emulated device has one stream and CPU memory).
#pragma once

#include "pyb_cuda_emu.h"

#include <c10/core/Allocator.h>
#include <c10/cuda/CUDAStream.h>

namespace c10 {
namespace cuda {
namespace CUDACachingAllocator {

inline void recordStream(const c10::DataPtr& /*data*/, CUDAStream /*stream*/) {
  ::pyb_emu::count_record_stream();
}

}  // namespace CUDACachingAllocator
}  // namespace cuda
}  // namespace c10
