// Emulation shim (tests/cuda_emu) for c10/cuda/CUDAException.h: error checks of the emulated
// runtime, and device-side asserts that record cudaErrorAssert instead of aborting.
#pragma once

#include "pyb_cuda_emu.h"

#include <c10/macros/Macros.h>

#define C10_CUDA_CHECK(EXPR)                          \
  do {                                                \
    const cudaError_t __err = EXPR;                   \
    ::pyb_emu::check(__err, __FILE__, __LINE__);      \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())

#undef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) ::pyb_emu::device_assert(#cond, __FILE__, __LINE__)
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  if (!(cond)) ::pyb_emu::device_assert(msg, __FILE__, __LINE__)
