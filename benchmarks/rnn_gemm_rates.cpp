// Rates of the recurrent layers' packed-product kernels, one thread: the float32 AVX2 kernel
// (csrc/cpu/rnn_gemm_avx2.h), the bf16 layers' AVX2 path (rows rounded to bf16, weights widened),
// the AVX512_BF16 kernel (csrc/cpu/rnn_gemm_avx512_bf16.h) and the int8 layers' product
// (csrc/cpu/rnn_int8.h: rows quantized on each call, then the AVX2 or, where the CPU has it, the
// AVX512-VNNI kernel), and the cost of packing each float kernel's weights (done once per layer
// call). C[m, n] += A[m, k] @ W^T, W [n, k] as the layers hold it; rounds interleaved, medians
// of 21. The CMake build (CMakeLists.txt, as .ci/run runs it) builds it:
//
//   build/cmake/fastner_gemm_rates [m k n ...]
//
// FASTNER_CPU_ISA=avx2 or a CPU without AVX512_BF16 leaves that column out (0);
// FASTNER_RNN_INT8=avx2 times the AVX2 int8 kernel where VNNI is present.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/rnn_gemm_avx2.h"
#include "cpu/rnn_gemm_avx512_bf16.h"
#include "cpu/rnn_int8.h"
#include "cpu/rnn_int8_vnni.h"

using namespace fastner::cpu::rnn;

namespace {

template <typename T>
T* aligned(size_t n) {
  return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64));
}

uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename Fn>
double seconds_per_call(Fn&& fn, int calls) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / calls;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void run(int64_t m, int64_t k, int64_t n, bool dot) {
  std::vector<float> a(m * k), w(n * k), c(m * n, 0.0f), rounded(m * k);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>((i * 7919) % 1000) / 1000.0f - 0.5f;
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>((i * 104729) % 1000) / 1000.0f - 0.5f;
  std::vector<uint16_t> w_bf16(w.size());
  for (size_t i = 0; i < w.size(); ++i) w_bf16[i] = bf16_bits(w[i]);
  float* panels_f32 = aligned<float>(avx2_gemm::packed_size(k, n));
  uint16_t* panels_bf16 = aligned<uint16_t>(avx2_gemm::packed_size(k, n));
  uint32_t* panels_dot = aligned<uint32_t>(avx512_bf16_gemm::packed_size(k, n));
  auto pack_f32 = [&] { avx2_gemm::pack<float>(w.data(), k, true, k, n, panels_f32); };
  auto pack_bf16 = [&] { avx2_gemm::pack<uint16_t>(w_bf16.data(), k, true, k, n, panels_bf16); };
  auto pack_dot = [&] { avx512_bf16_gemm::pack(w_bf16.data(), k, true, k, n, panels_dot); };
  auto f32 = [&] { avx2_gemm::multiply<float>(m, n, k, a.data(), k, panels_f32, true, c.data(), n); };
  auto bf16_avx2 = [&] {
    avx2_gemm::round_rows_to_bf16(m, k, a.data(), k, rounded.data());
    avx2_gemm::multiply<uint16_t>(m, n, k, rounded.data(), k, panels_bf16, true, c.data(), n);
  };
  auto bf16_dot = [&] { avx512_bf16_gemm::multiply(m, n, k, a.data(), k, panels_dot, true, c.data(), n); };
  // int8: weights in [-63, 63] (the s7 range the packing requires), one scale per channel.
  std::vector<int8_t> w_int8(w.size());
  for (size_t i = 0; i < w.size(); ++i) w_int8[i] = static_cast<int8_t>(static_cast<int>((i * 104729) % 127) - 63);
  const std::vector<float> w_scale(n, 1.0f / 63.0f);
  std::vector<int8_t> packed_int8(int8::packed_bytes(n, k));
  int8::pack(w_int8.data(), w_scale.data(), n, k, packed_int8.data(), "w");
  const int8::PackedWeights weights_int8(packed_int8.data(), static_cast<int64_t>(packed_int8.size()), n, k, "w");
  auto int8_product = [&] { weights_int8.multiply(m, a.data(), k, 1.0f, c.data(), n); };
  pack_f32();
  pack_bf16();
  pack_dot();
  const double flops = 2.0 * static_cast<double>(m) * n * k;
  const int calls = std::max(1, static_cast<int>(2e7 / flops));
  std::vector<double> t[4], p[3];
  for (int round = 0; round < 21; ++round) {
    t[0].push_back(seconds_per_call(f32, calls));
    t[1].push_back(seconds_per_call(bf16_avx2, calls));
    if (dot) t[2].push_back(seconds_per_call(bf16_dot, calls));
    t[3].push_back(seconds_per_call(int8_product, calls));
    p[0].push_back(seconds_per_call(pack_f32, 3));
    p[1].push_back(seconds_per_call(pack_bf16, 3));
    if (dot) p[2].push_back(seconds_per_call(pack_dot, 3));
  }
  std::printf("[%lld, %lld] x [%lld, %lld]  GFLOP/s: fp32 avx2 %6.1f  bf16 avx2 %6.1f  avx512_bf16 %6.1f"
              "  int8 (GOP/s) %6.1f   pack us: %5.1f %5.1f %5.1f\n",
              static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(k),
              static_cast<long long>(n), flops / median(t[0]) / 1e9, flops / median(t[1]) / 1e9,
              dot ? flops / median(t[2]) / 1e9 : 0.0, flops / median(t[3]) / 1e9, median(p[0]) * 1e6,
              median(p[1]) * 1e6, dot ? median(p[2]) * 1e6 : 0.0);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> shapes = {32, 200, 800, 512, 130, 800, 256, 130, 800, 1, 200, 800, 4, 200, 800, 12, 200, 800};
  if (argc > 1) {
    shapes.clear();
    for (int i = 1; i + 2 < argc; i += 3)
      for (int j = 0; j < 3; ++j) shapes.push_back(std::atoll(argv[i + j]));
  }
  const bool dot = avx512_bf16_gemm::available();
  std::printf("avx512_bf16 kernel: %s; int8 kernel: %s\n", dot ? "available" : "not available (column 0)",
              int8::vnni_selected() ? "avx512_vnni" : "avx2");
  for (size_t i = 0; i + 2 < shapes.size(); i += 3) run(shapes[i], shapes[i + 1], shapes[i + 2], dot);
}
