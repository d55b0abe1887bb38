// Stand-in for the CPU emulation (see ../../emu.h): a stream is a tag; the current one is thread-local.
#pragma once
#include "emu.h"
namespace c10 { namespace cuda {
struct CUDAStream { cudaStream_t s; cudaStream_t stream() const { return s; } int device_index() const { return 0; }
  operator cudaStream_t() const { return s; } };
inline thread_local CUDAStream current_stream{(cudaStream_t)0x1};
inline CUDAStream current() { return current_stream; }
struct CUDAStreamGuard { CUDAStream saved; explicit CUDAStreamGuard(CUDAStream s) : saved(current_stream) { current_stream = s; }
  ~CUDAStreamGuard() { current_stream = saved; } };
struct CUDAGuard { template <typename D> explicit CUDAGuard(D) {} };
}}
