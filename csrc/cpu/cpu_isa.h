// The one CPU-feature probe of every CPU kernel family (the CRF lane kernels, the RNN cell
// passes, the RNN GEMMs): which vector instruction set they run. AVX-512 where the CPU has
// AVX-512 F, DQ, BW and VL, else AVX2 (the build's baseline); on top of AVX-512, AMX tiles where
// the CPU has them and Linux grants this process their state. FASTNER_CPU_ISA caps it for tests
// and comparisons: "avx2" forces AVX2 everywhere, "avx512" keeps AVX-512 but no AMX; another
// non-empty value raises ValueError. Decided once per process; fastner.backend() reports it as
// "cpu_simd" (and each family's kernel, "cpu_int8", "cpu_bf16").
#pragma once

#include <cstdint>

namespace fastner::cpu {

enum class Isa { AVX2, AVX512 };

Isa isa();
const char* isa_name();  // "avx2" or "avx512"

// Whether kernels may use AMX tiles: isa() is AVX512, FASTNER_CPU_ISA is not "avx512", the CPU
// has AMX-TILE, and the kernel gave this process the tile data state (arch_prctl
// ARCH_REQ_XCOMP_PERM, which Linux 5.16+ requires before the first tile instruction; asked once,
// for every thread). Each family checks its own AMX feature (amx-bf16, amx-int8) beside this.
bool amx_tiles();

// ldtilecfg's 64-byte operand as fastner's AMX kernels (rnn_gemm_amx_bf16.cpp,
// rnn_int8_amx.cpp) set it: palette 1, tiles 0-7 all 16 rows of 64 bytes (16 x 16 float32 or
// int32 sums, 16 rows x 32 bf16 or 64 int8 of A, 16 pairs / quads of k x 16 columns of B).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Whether the environment variable `name` (FASTNER_RNN_INT8) forces the AVX2 kernels: true for
// "avx2", false when unset or empty; c10::ValueError naming it for any other value (a misspelt
// one must not leave the AVX-512 kernels on without a word); `otherwise` says what runs when it
// is unset, for the message.
bool env_forces_avx2(const char* name, const char* otherwise);

}  // namespace fastner::cpu
