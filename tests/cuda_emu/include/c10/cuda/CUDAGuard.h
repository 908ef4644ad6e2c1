// Emulation shim (tests/cuda_emu) for c10/cuda/CUDAGuard.h. The emulated device's tensors are
// CPU tensors: the guard accepts them and refuses anything else (a real CUDA tensor here would
// mean the emulated library was handed data of the real device).
#pragma once

#include "pyb_cuda_emu.h"

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "emulated CUDA: expected a tensor of the emulated device (CPU "
                "memory), got one on ", device);
  }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

}  // namespace cuda
}  // namespace c10
