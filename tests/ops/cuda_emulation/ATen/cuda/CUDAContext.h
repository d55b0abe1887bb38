// Stand-in for the CPU emulation (see ../../emu.h): streams and the cuBLAS handle.
#pragma once
#include <cublas_v2.h>
#include <c10/cuda/CUDAStream.h>
namespace at { namespace cuda {
inline c10::cuda::CUDAStream getCurrentCUDAStream() { return c10::cuda::current(); }
inline c10::cuda::CUDAStream getStreamFromPool(bool = false, int = 0) { return c10::cuda::CUDAStream{(cudaStream_t)0x2}; }
inline cublasHandle_t getCurrentCUDABlasHandle() { return nullptr; }
}}
