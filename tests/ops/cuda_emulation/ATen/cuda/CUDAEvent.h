// Stand-in for the CPU emulation (see ../../emu.h): events are no-ops (one host thread).
#pragma once
#include <c10/cuda/CUDAStream.h>
namespace at { namespace cuda {
struct CUDAEvent { void record(const c10::cuda::CUDAStream&) {} void block(const c10::cuda::CUDAStream&) {} };
}}
