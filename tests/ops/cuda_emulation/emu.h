// CPU emulation of the CUDA runtime pieces that csrc/cuda/rnn.cu and csrc/cuda/kernels/rnn.cuh
// use, so that tests/ops/rnn/test_rnn_cuda_emulated.py can run the real binding and kernel code on a
// machine without a GPU (test harness only; never part of the package). Kernels launched with
// <<<...>>> run as one emulated thread (their grid-stride loops cover every index); cooperative
// launches run every thread of every block as a std::thread, with std::barrier for
// __syncthreads() and grid.sync(), and a per-block buffer as dynamic shared memory.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
namespace emu {
inline thread_local uint3 t_threadIdx{0, 0, 0}, t_blockIdx{0, 0, 0};
inline thread_local dim3 t_blockDim{1, 1, 1}, t_gridDim{1, 1, 1};
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* grid_barrier = nullptr;
inline thread_local unsigned char* smem_ptr = nullptr;
inline unsigned char* block_smem() { return smem_ptr; }
inline long launches = 0, cooperative_launches = 0;
template <typename F, typename... Args>
void launch(dim3, dim3, size_t, cudaStream_t, F kernel, Args... args) {
  ++launches;
  t_threadIdx = {0, 0, 0}; t_blockIdx = {0, 0, 0}; t_blockDim = dim3(1); t_gridDim = dim3(1);  // grid-stride loops cover all
  kernel(args...);
}
// Set by the harness: runs a cooperative kernel given its type-erased pointer and params.
inline std::function<void(const void*, void**)> call_cooperative;
inline void run_cooperative(const void* func, dim3 grid, dim3 block, void** params, size_t smem) {
  ++cooperative_launches;
  const unsigned nb = grid.x, nt = block.x;
  std::barrier<> gbar(nb * nt);
  std::vector<std::unique_ptr<std::barrier<>>> bbars;
  std::vector<std::vector<unsigned char>> smems(nb, std::vector<unsigned char>(smem + 16));
  for (unsigned b = 0; b < nb; ++b) bbars.emplace_back(new std::barrier<>(nt));
  std::vector<std::thread> threads;
  for (unsigned b = 0; b < nb; ++b)
    for (unsigned t = 0; t < nt; ++t)
      threads.emplace_back([&, b, t] {
        t_threadIdx = {t, 0, 0}; t_blockIdx = {b, 0, 0}; t_blockDim = block; t_gridDim = grid;
        block_barrier = bbars[b].get(); grid_barrier = &gbar; smem_ptr = smems[b].data();
        call_cooperative(func, params);
      });
  for (auto& th : threads) th.join();
}
}  // namespace emu
#define threadIdx emu::t_threadIdx
#define blockIdx emu::t_blockIdx
#define blockDim emu::t_blockDim
#define gridDim emu::t_gridDim
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
template <typename T> inline T __ldcg(const T* p) { return *p; }
namespace cooperative_groups {
struct grid_group { void sync() { emu::grid_barrier->arrive_and_wait(); } };
inline grid_group this_grid() { return {}; }
}
