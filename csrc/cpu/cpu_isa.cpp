// The CPU-feature probe shared by every CPU kernel family (see cpu_isa.h).
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastner::cpu {
namespace {

// FASTNER_CPU_ISA's cap: 0 none (unset or empty), 1 "avx2", 2 "avx512"; ValueError otherwise.
int isa_cap() {
  static const int cap = [] {
    const char* forced = std::getenv("FASTNER_CPU_ISA");
    if (forced == nullptr || forced[0] == '\0') return 0;
    if (std::strcmp(forced, "avx2") == 0) return 1;
    if (std::strcmp(forced, "avx512") == 0) return 2;
    TORCH_CHECK_VALUE(false,
                      "FASTNER_CPU_ISA must be 'avx2' or 'avx512' (or unset: the best the CPU has, AMX tiles "
                      "included), got '",
                      forced, "'");
    return 0;
  }();
  return cap;
}

}  // namespace

Isa isa() {
  static const Isa chosen = [] {
    if (isa_cap() == 1) return Isa::AVX2;
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

bool amx_tiles() {
  static const bool granted = [] {
    if (isa() != Isa::AVX512 || isa_cap() == 2) return false;
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__) && defined(__x86_64__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile")) return false;
    // Linux keeps the 8 KB tile data out of a thread's saved state until the process asks:
    // without this the first tile instruction faults (SIGILL). Process-wide, idempotent.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return granted;
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
