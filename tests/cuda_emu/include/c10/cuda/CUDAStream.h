// Emulation shim (tests/cuda_emu): the emulated device has one stream, the null stream.
#pragma once

#include "pyb_cuda_emu.h"

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(signed char /*device_index*/ = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
