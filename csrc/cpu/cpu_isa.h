// The one CPU-feature probe of every CPU kernel family (the CRF lane kernels, the RNN cell
// passes): which vector instruction set they run. AVX-512 where the CPU has AVX-512 F, DQ, BW
// and VL, else AVX2 (the build's baseline); FASTNER_CPU_ISA=avx2 forces AVX2 everywhere (tests
// and comparisons on an AVX-512 machine; another non-empty value raises ValueError). Decided once
// per process; fastner.backend() reports it as "cpu_simd".
#pragma once

namespace fastner::cpu {

enum class Isa { AVX2, AVX512 };

Isa isa();
const char* isa_name();  // "avx2" or "avx512"

// Whether the environment variable `name` (FASTNER_CPU_ISA, FASTNER_RNN_INT8) forces the AVX2
// kernels: true for "avx2", false when unset or empty; c10::ValueError naming it for any other
// value (a misspelt one must not leave the AVX-512 kernels on without a word); `otherwise` says
// what runs when it is unset, for the message.
bool env_forces_avx2(const char* name, const char* otherwise);

}  // namespace fastner::cpu
