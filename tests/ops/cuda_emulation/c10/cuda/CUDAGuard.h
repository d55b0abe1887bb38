// Stand-in for the CPU emulation (see ../../emu.h).
#pragma once
#include <c10/cuda/CUDAStream.h>
