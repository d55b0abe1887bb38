// CPU definitions of the CUDA runtime calls the binding makes (see emu.h); test harness only.
#pragma once
#include "emu.h"
namespace fastner::cuda::rnn::kernels {
inline bool emu_call_registered = [] {
  emu::call_cooperative = [](const void* f, void** params) {
#define EMU_TRY(E, C)                                                                                         \
  if (f == reinterpret_cast<const void*>(&persistent_forward_kernel<E, C>)) {                                \
    persistent_forward_kernel<E, C>(*static_cast<PersistentArgs<E>*>(params[0]));                            \
    return;                                                                                                  \
  }                                                                                                          \
  if (f == reinterpret_cast<const void*>(&persistent_backward_kernel<E, C>)) {                               \
    persistent_backward_kernel<E, C>(*static_cast<PersistentBackwardArgs<E>*>(params[0]));                   \
    return;                                                                                                  \
  }
#define EMU_TRY_ALL(E) EMU_TRY(E, Cell::LSTM) EMU_TRY(E, Cell::GRU) EMU_TRY(E, Cell::RNN_TANH) EMU_TRY(E, Cell::RNN_RELU)
    EMU_TRY_ALL(float) EMU_TRY_ALL(double) EMU_TRY_ALL(__half) EMU_TRY_ALL(__nv_bfloat16)
    throw std::runtime_error("emu: unknown cooperative kernel");
  };
  return true;
}();
}
inline int emu_sms = 4;
extern "C" {

cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu_sms : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 200 * 1024 : 1;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) { *n = 2; return cudaSuccess; }
cudaError_t cudaLaunchCooperativeKernel(const void* f, dim3 g, dim3 b, void** p, size_t smem, cudaStream_t) {
  emu::run_cooperative(f, g, b, p, smem);
  return cudaSuccess;
}
cudaError_t cudaMemset2DAsync(void* p, size_t pitch, int v, size_t w, size_t h, cudaStream_t) {
  for (size_t r = 0; r < h; ++r) std::memset(static_cast<char*>(p) + r * pitch, v, w);
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emu error"; }
}
