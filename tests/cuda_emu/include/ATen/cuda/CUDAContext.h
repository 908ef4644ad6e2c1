// Emulation shim (tests/cuda_emu) for ATen/cuda/CUDAContext.h: the current stream.
#pragma once

#include "pyb_cuda_emu.h"

#include <c10/cuda/CUDAStream.h>

namespace at {
namespace cuda {
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace at
