// CUDA emulation on the host, for tests only (never installed, never part of the wheel).
//
// tests/cuda_emu/build.py compiles the real csrc/cuda/*.cu sources as C++ with this header
// force-included (-include) and with the shim headers next to it first on the include path
// (ATen/cuda/CUDAContext.h, c10/cuda/...), after rewriting every launch
//     kernel<<<grid, block, smem, stream>>>(args...);
// into
//     ::pyb_emu::launch("kernel", kernel, grid, block, smem, stream, args...);
//
// Execution model (tests/cuda_emu/runtime.cpp):
// - one host thread per CUDA thread of a block; `__syncthreads()` is a barrier across the
//   block's host threads. The threads of a block run one at a time in a fixed order (thread 0,
//   1, ... up to the next barrier, then again from thread 0), so a run is deterministic and a
//   missing barrier shows up as a wrong value, not as a flaky one. A thread that never reaches a
//   barrier runs on the host thread its predecessor finished on (no thread switch).
// - the blocks of a grid run one after the other, launches one at a time (a global lock), so
//   `__shared__` variables are plain function-local statics: per-block storage.
// - launch configurations are checked as CUDA checks them: a zero-sized grid or block, more
//   than 1024 threads per block, grid.y/z > 65535 or grid.x > 2^31 - 1 make the launch fail
//   with cudaErrorInvalidConfiguration ("invalid configuration argument"), reported by the next
//   cudaGetLastError() (C10_CUDA_KERNEL_LAUNCH_CHECK).
// - CUDA_KERNEL_ASSERT(_MSG) records a device-side assert (cudaErrorAssert), reported by the
//   next cudaGetLastError() or synchronisation, and the thread continues (as in CUDA, where the
//   kernel is aborted and the context poisoned; the emulator keeps going so tests can continue).
// - counters (launches, synchronisations, stream records) are readable from Python through
//   torch.ops.pyboundary_emu._emu_stats().
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Per-block storage: blocks of a launch run one after another, launches one at a time.
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned int x, y, z;
};

// The emulated device has one (null) stream.
typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorAssert = 710,
};

// Built-in variables of the running CUDA thread (set by the emulator on its host thread).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace pyb_emu {

// Runs body() once per CUDA thread of the grid (see the execution model above); a bad
// configuration records cudaErrorInvalidConfiguration and runs nothing.
void launch_impl(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                 const std::function<void()>& body);

// Barrier of the current block (__syncthreads).
void syncthreads();

// A failed CUDA_KERNEL_ASSERT in the current CUDA thread.
void device_assert(const char* what, const char* file, int line);

// Error state (cudaGetLastError: the pending error, cleared) and its message.
cudaError_t get_last_error();
const char* error_string(cudaError_t err);
// Throws a c10::Error ("CUDA error: ...") for err != cudaSuccess (C10_CUDA_CHECK).
void check(cudaError_t err, const char* file, int line);

// Counters read by the tests.
void count_sync();
void count_record_stream();

// A launch: the arguments are converted to the kernel's parameter types and copied, as CUDA
// copies kernel arguments at launch.
template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
            cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  launch_impl(name, grid, block, smem, stream, [&] { std::apply(kernel, params); });
}

}  // namespace pyb_emu

inline void __syncthreads() { ::pyb_emu::syncthreads(); }

// Atomics: the threads of an emulated grid run one at a time, so a plain read-modify-write is
// atomic.
template <typename T>
inline T atomicAdd(T* address, T val) {
  const T old = *address;
  *address = old + val;
  return old;
}

inline cudaError_t cudaGetLastError() { return ::pyb_emu::get_last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return ::pyb_emu::error_string(err); }
// Synchronisations of the emulated device (every launch has finished when it returns); counted.
inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  ::pyb_emu::count_sync();
  return ::pyb_emu::get_last_error();
}
inline cudaError_t cudaDeviceSynchronize() {
  ::pyb_emu::count_sync();
  return ::pyb_emu::get_last_error();
}
