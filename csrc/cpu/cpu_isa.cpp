// The CPU-feature probe shared by every CPU kernel family (see cpu_isa.h).
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace fastner::cpu {

Isa isa() {
  static const Isa chosen = [] {
    if (env_forces_avx2("FASTNER_CPU_ISA", "AVX-512 where the CPU has it")) return Isa::AVX2;
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      return Isa::AVX512;
    }
#endif
    return Isa::AVX2;
  }();
  return chosen;
}

bool env_forces_avx2(const char* name, const char* otherwise) {
  const char* forced = std::getenv(name);
  if (forced == nullptr || forced[0] == '\0') return false;
  TORCH_CHECK_VALUE(std::strcmp(forced, "avx2") == 0, name, " must be 'avx2' (or unset: ", otherwise, "), got '", forced,
                    "'");
  return true;
}

const char* isa_name() { return isa() == Isa::AVX512 ? "avx512" : "avx2"; }

}  // namespace fastner::cpu
