// A CPU emulation of the little of CUDA that csrc/cuda/kernels/*.cuh use, for testing kernels on
// a machine without a GPU: every thread of a block is a std::thread, __syncthreads() and
// __syncwarp() are barrier waits (block-wide and per 32 consecutive threads), dynamic and
// static shared memory are process-wide buffers (blocks run one after another), and the CUDA
// runtime calls the kernels' launchers make succeed without a device.
//
// What it checks: indexing, shared-memory layout, the barrier structure (a barrier reached by
// only part of a group deadlocks here), and the numbers. What it cannot check: warp-synchronous
// behaviour beyond the barriers, real memory-model races, the device's math functions (the host
// libm stands in), register/shared-memory limits and performance.
//
// Include this before the kernel header; it defines FASTNER_CRF_EMULATION.
#pragma once

#define FASTNER_CRF_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <condition_variable>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {

// A barrier that sleeps (std::barrier spins first, which starves a loaded machine running
// hundreds of emulated threads on a few cores).
class Barrier {
 public:
  explicit Barrier(unsigned count) : expected_(count), remaining_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long generation = generation_;
    if (--remaining_ == 0) {
      release();
    } else {
      // A barrier that some threads of the group never reach is a kernel bug: fail loudly.
      if (!cv_.wait_for(lock, std::chrono::seconds(120), [&] { return generation_ != generation; })) {
        std::fprintf(stderr, "emulate_cuda: barrier timed out (threads diverged around a barrier?)\n");
        std::abort();
      }
    }
  }
  // Leave for good: later phases wait for one thread fewer.
  void arrive_and_drop() {
    std::unique_lock<std::mutex> lock(mutex_);
    --expected_;
    if (--remaining_ == 0) release();
  }

 private:
  void release() {
    ++generation_;
    remaining_ = expected_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned expected_, remaining_;
  unsigned long generation_ = 0;
};

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline std::unique_ptr<Barrier> block_barrier;
inline std::vector<std::unique_ptr<Barrier>> warp_barriers;
inline std::vector<unsigned char> shared_memory;

inline unsigned linear_thread() { return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z); }

template <typename... Params, typename... Args>
void run(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        // Garbage (all bits set: NaN for floats) so that reads before writes show up.
        shared_memory.assign(smem + 16, 0xff);
        block_barrier = std::make_unique<Barrier>(threads);
        warp_barriers.clear();
        for (unsigned w = 0; w * 32 < threads; ++w) {
          const unsigned in_warp = threads - w * 32 < 32 ? threads - w * 32 : 32;
          warp_barriers.push_back(std::make_unique<Barrier>(in_warp));
        }
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([=] {
            thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            block_idx = uint3{bx, by, bz};
            kernel(static_cast<Params>(args)...);
            // An exited thread no longer holds back the barriers (as on the GPU).
            warp_barriers[t / 32]->arrive_and_drop();
            block_barrier->arrive_and_drop();
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}

template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const {
    run(kernel, grid, block, smem, args...);
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, size_t smem) {
  return Launch<Kernel>{kernel, grid, block, smem};
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barriers[emu::linear_thread() / 32]->arrive_and_wait(); }
inline float __int_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline double __longlong_as_double(long long bits) {
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}
inline unsigned char* dynamic_smem() { return emu::shared_memory.data(); }

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

#define FASTNER_CRF_STRIP(...) __VA_ARGS__
#define FASTNER_CRF_LAUNCH(kernel, grid, block, smem, stream) emu::launch(FASTNER_CRF_STRIP kernel, grid, block, smem)

// The runtime calls of the launchers, answered without a device.
extern "C" {
inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
}
