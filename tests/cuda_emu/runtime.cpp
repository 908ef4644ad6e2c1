// The CUDA emulator's runtime (tests/cuda_emu/include/pyb_cuda_emu.h has the execution model):
// kernel launches on host threads, the block barrier, error state, counters, and the
// emulator's own ops torch.ops.pyboundary_emu._emu_stats / _emu_reset_stats.
#include "pyb_cuda_emu.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace pyb_emu {

namespace {

// ---- error state and counters --------------------------------------------------------------

std::mutex g_error_mutex;
cudaError_t g_error = cudaSuccess;
std::string g_error_detail;

void set_error(cudaError_t err, const std::string& detail) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  if (g_error == cudaSuccess) {  // the first error is reported, as CUDA reports the first
    g_error = err;
    g_error_detail = detail;
  }
}

std::atomic<int64_t> g_launches{0}, g_blocks{0}, g_syncs{0}, g_record_streams{0};

// ---- host threads ---------------------------------------------------------------------------

class Semaphore {
 public:
  void post() {
    std::lock_guard<std::mutex> lock(m_);
    ++count_;
    cv_.notify_one();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    cv_.wait(lock, [&] { return count_ > 0; });
    --count_;
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int count_ = 0;
};

enum class State { NotStarted, Running, AtBarrier, Exited };

// One block being executed: its CUDA threads, their states and the host thread (semaphore)
// each started one waits on.
struct BlockRun {
  const std::function<void()>* body;
  const char* name;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  int n;  // threads in the block
  std::mutex m;
  std::vector<State> state;
  std::vector<Semaphore*> host;  // the semaphore of the host thread running each CUDA thread
  int alive;
  bool done = false;
  std::condition_variable done_cv;
};

// The CUDA thread to run after t yields (reaches a barrier or exits), caller holds br.m: the
// next live thread after t in this phase, else (t ended the phase) the first live thread of
// the next phase; -1 when every thread has exited.
int pick_next(BlockRun& br, int t) {
  for (int u = t + 1; u < br.n; ++u)
    if (br.state[u] != State::Exited) return u;
  if (br.alive == 0) return -1;
  for (int u = 0; u < br.n; ++u)
    if (br.state[u] != State::Exited) return u;
  return -1;
}

thread_local BlockRun* tl_block = nullptr;
thread_local int tl_tid = -1;
thread_local Semaphore* tl_sem = nullptr;

// Runs CUDA thread t of br on this host thread, then, while the next thread to run has not
// started yet, that one too (a thread that exits frees its host thread).
void run_threads(BlockRun* br, int t, Semaphore* sem) {
  for (;;) {
    const int bx = br->block_dim.x, by = br->block_dim.y;
    threadIdx = uint3{static_cast<unsigned>(t % bx), static_cast<unsigned>((t / bx) % by),
                      static_cast<unsigned>(t / (bx * by))};
    blockIdx = br->block_idx;
    blockDim = br->block_dim;
    gridDim = br->grid_dim;
    tl_block = br;
    tl_tid = t;
    tl_sem = sem;
    try {
      (*br->body)();
    } catch (const std::exception& e) {
      set_error(cudaErrorLaunchFailure, std::string(br->name) + ": exception in device code: " + e.what());
    }
    tl_block = nullptr;
    std::unique_lock<std::mutex> lock(br->m);
    br->state[t] = State::Exited;
    --br->alive;
    const int u = pick_next(*br, t);
    if (u < 0) {
      br->done = true;
      br->done_cv.notify_all();
      return;  // br may be destroyed as soon as the lock is released
    }
    if (br->state[u] == State::NotStarted) {
      br->state[u] = State::Running;
      br->host[u] = sem;
      t = u;  // run it here
      continue;
    }
    br->state[u] = State::Running;
    br->host[u]->post();
    return;
  }
}

// ---- the pool of host threads ----------------------------------------------------------------

struct Worker {
  Semaphore sem;
  BlockRun* br = nullptr;
  int tid = -1;
};

class Pool {
 public:
  // A host thread that starts CUDA thread t of br.
  void start(BlockRun* br, int t) {
    Worker* w = nullptr;
    {
      std::lock_guard<std::mutex> lock(m_);
      if (!idle_.empty()) {
        w = idle_.back();
        idle_.pop_back();
      }
    }
    if (w == nullptr) {
      w = new Worker();  // lives as long as the process (the pool is never destroyed)
      std::thread([this, w] { loop(w); }).detach();
    }
    w->br = br;
    w->tid = t;
    br->host[t] = &w->sem;
    w->sem.post();
  }

 private:
  void loop(Worker* w) {
    for (;;) {
      w->sem.wait();
      run_threads(w->br, w->tid, &w->sem);
      std::lock_guard<std::mutex> lock(m_);
      idle_.push_back(w);
    }
  }
  std::mutex m_;
  std::vector<Worker*> idle_;
};

Pool& pool() {
  static Pool* p = new Pool();  // leaked: its threads outlive static destruction
  return *p;
}

// Gives the turn to CUDA thread u (caller holds br.m, u != the caller's thread).
void hand_over(BlockRun& br, int u) {
  if (br.state[u] == State::NotStarted) {
    br.state[u] = State::Running;
    pool().start(&br, u);
  } else {
    br.state[u] = State::Running;
    br.host[u]->post();
  }
}

std::mutex g_launch_mutex;  // one launch at a time: __shared__ statics are per block

bool valid_config(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && block.x >= 1 && block.y >= 1 &&
         block.z >= 1 && threads <= 1024 && block.z <= 64 && grid.x <= 2147483647u &&
         grid.y <= 65535 && grid.z <= 65535;
}

}  // namespace

void launch_impl(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t,
                 const std::function<void()>& body) {
  std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
  ++g_launches;
  if (!valid_config(grid, block) || smem > 48 * 1024) {
    set_error(cudaErrorInvalidConfiguration,
              std::string(name) + "<<<(" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                  ", " + std::to_string(grid.z) + "), (" + std::to_string(block.x) + ", " +
                  std::to_string(block.y) + ", " + std::to_string(block.z) + ")>>>");
    return;
  }
  static thread_local Semaphore own;  // the launching host thread runs thread 0 of each block
  const int n = static_cast<int>(block.x * block.y * block.z);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        BlockRun br;
        br.body = &body;
        br.name = name;
        br.block_idx = uint3{x, y, z};
        br.block_dim = block;
        br.grid_dim = grid;
        br.n = n;
        br.state.assign(n, State::NotStarted);
        br.host.assign(n, nullptr);
        br.alive = n;
        {
          std::lock_guard<std::mutex> lock(br.m);
          br.state[0] = State::Running;
          br.host[0] = &own;
        }
        run_threads(&br, 0, &own);
        std::unique_lock<std::mutex> lock(br.m);
        br.done_cv.wait(lock, [&] { return br.done; });
        ++g_blocks;
      }
    }
  }
}

void syncthreads() {
  BlockRun* br = tl_block;
  TORCH_CHECK(br != nullptr, "emulated CUDA: __syncthreads() outside a kernel");
  const int t = tl_tid;
  Semaphore* sem = tl_sem;
  {
    std::lock_guard<std::mutex> lock(br->m);
    br->state[t] = State::AtBarrier;
    const int u = pick_next(*br, t);
    if (u == t) {  // the only live thread: the barrier is already complete
      br->state[t] = State::Running;
      return;
    }
    hand_over(*br, u);
  }
  sem->wait();  // resumed by the thread before it in the next phase (state set to Running)
  // the thread-locals are still this CUDA thread's: a waiting thread keeps its host thread
}

void device_assert(const char* what, const char* file, int line) {
  char where[64];
  std::snprintf(where, sizeof(where), "block (%u, %u, %u), thread (%u, %u, %u)", blockIdx.x,
                blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  set_error(cudaErrorAssert, std::string(file) + ":" + std::to_string(line) + ": " + where +
                                 ": Assertion failed: " + what);
}

cudaError_t get_last_error() {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  const cudaError_t err = g_error;
  g_error = cudaSuccess;
  return err;
}

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

void check(cudaError_t err, const char* file, int line) {
  if (err == cudaSuccess) return;
  std::string detail;
  {
    std::lock_guard<std::mutex> lock(g_error_mutex);
    detail.swap(g_error_detail);
  }
  TORCH_CHECK(false, "CUDA error (emulated): ", error_string(err), " (", detail, ") at ", file,
              ":", line);
}

void count_sync() { ++g_syncs; }
void count_record_stream() { ++g_record_streams; }

}  // namespace pyb_emu

namespace {

std::tuple<int64_t, int64_t, int64_t, int64_t> emu_stats() {
  return {pyb_emu::g_launches.load(), pyb_emu::g_blocks.load(), pyb_emu::g_syncs.load(),
          pyb_emu::g_record_streams.load()};
}

void emu_reset_stats() {
  pyb_emu::g_launches = 0;
  pyb_emu::g_blocks = 0;
  pyb_emu::g_syncs = 0;
  pyb_emu::g_record_streams = 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyboundary_emu, m) {
  // (kernel launches, blocks run, device synchronisations, recordStream calls) since the last reset.
  m.def("_emu_stats() -> (int, int, int, int)", &emu_stats);
  m.def("_emu_reset_stats() -> ()", &emu_reset_stats);
}
