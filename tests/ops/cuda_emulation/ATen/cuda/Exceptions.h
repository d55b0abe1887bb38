// Stand-in for the CPU emulation (see ../../emu.h).
#pragma once
#include <cublas_v2.h>
#include <c10/util/Exception.h>
#define TORCH_CUDABLAS_CHECK(expr) TORCH_CHECK((expr) == CUBLAS_STATUS_SUCCESS, "cublas failed")
