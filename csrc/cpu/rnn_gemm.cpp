// The per-machine choice of the float32 kernel behind PackedRight (see rnn_gemm.h): timed at
// first use of each shape, remembered for the process; and the bf16 weights' kernel.
#include "cpu/rnn_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

namespace fastner::cpu::rnn {
namespace {

struct Choice {
  RightKernel kernel;
  std::string line;  // the report line
};

// (k, n, max_m, BLAS threads) -> choice.
using Key = std::tuple<int64_t, int64_t, int64_t, int>;

std::mutex& choices_mutex() {
  static std::mutex m;
  return m;
}
std::map<Key, Choice>& choices() {
  static std::map<Key, Choice> c;
  return c;
}

// "bf16 k=.. n=..: <kernel>" lines, one per bf16 weight shape run.
std::map<std::pair<int64_t, int64_t>, std::string>& bf16_lines() {
  static std::map<std::pair<int64_t, int64_t>, std::string> lines;
  return lines;
}

bool mkl_packed_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// Best of `rounds` of fn(), in seconds, after one untimed call.
template <typename Fn>
double best_seconds(Fn&& fn, int rounds) {
  fn();
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Times both kernels on [max_m, k] x [k, n] (interleaved: 5 rounds, each timing both once) in
// the calling thread's BLAS setting, and picks the faster.
Choice measure(int64_t k, int64_t n, int64_t max_m, int blas_threads) {
  std::vector<float> a(max_m * k), b(k * n), c(max_m * n, 0.0f);
  // Values in [-0.5, 0.5): no denormals, no overflow; the rate does not depend on them.
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>((i * 7919) % 1000) / 1000.0f - 0.5f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>((i * 104729) % 1000) / 1000.0f - 0.5f;
  std::vector<float> panels(avx2_gemm::packed_size(k, n));
#ifdef FASTNER_RNN_GEMM_AVX2
  avx2_gemm::pack<float>(b.data(), n, /*trans_b=*/false, k, n, panels.data());
#endif
  const int im = static_cast<int>(max_m), in = static_cast<int>(n), ik = static_cast<int>(k);
  std::vector<char> mkl_buffer(cblas_sgemm_pack_get_size(162, im, in, ik) + 64);
  float* mkl_packed = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(mkl_buffer.data()) + 63) / 64 * 64);
  cblas_sgemm_pack(101, 162, 111, im, in, ik, 1.0f, b.data(), in, mkl_packed);
  auto run_mkl = [&] {
    cblas_sgemm_compute(101, 111, 151, im, in, ik, a.data(), ik, mkl_packed, in, 1.0f, c.data(), in);
  };
  auto run_avx2 = [&] {
#ifdef FASTNER_RNN_GEMM_AVX2
    avx2_gemm::multiply<float>(max_m, n, k, a.data(), k, panels.data(), true, c.data(), n);
#endif
  };
  double mkl = 1e30, avx2 = 1e30;
  for (int round = 0; round < 5; ++round) {
    mkl = std::min(mkl, best_seconds(run_mkl, 1));
    avx2 = std::min(avx2, best_seconds(run_avx2, 1));
  }
  const double flops = 2.0 * static_cast<double>(max_m) * n * k;
  Choice choice{avx2 < mkl ? RightKernel::Avx2 : RightKernel::MklPacked, ""};
  char line[200];
  std::snprintf(line, sizeof line, "k=%lld n=%lld m<=%lld blas_threads=%d: mkl_packed %.1f, avx2 %.1f GFLOP/s -> %s",
                static_cast<long long>(k), static_cast<long long>(n), static_cast<long long>(max_m), blas_threads,
                flops / mkl / 1e9, flops / avx2 / 1e9, choice.kernel == RightKernel::Avx2 ? "avx2" : "mkl_packed");
  choice.line = line;
  return choice;
}

}  // namespace

RightKernel choose_float_kernel(int64_t k, int64_t n, int64_t max_m) {
  const bool has_mkl = mkl_packed_available(), has_avx2 = avx2_gemm::available();
  const char* forced = std::getenv("FASTNER_RNN_GEMM");
  if (forced != nullptr && forced[0] != '\0') {
    if (std::strcmp(forced, "mkl") == 0) return has_mkl ? RightKernel::MklPacked : RightKernel::Gemm;
    if (std::strcmp(forced, "avx2") == 0) return has_avx2 ? RightKernel::Avx2 : RightKernel::Gemm;
    TORCH_CHECK_VALUE(false, "FASTNER_RNN_GEMM must be 'mkl' or 'avx2' (or unset: measured), got '", forced, "'");
  }
  if (!has_mkl || !has_avx2) return has_avx2 ? RightKernel::Avx2 : has_mkl ? RightKernel::MklPacked : RightKernel::Gemm;
  // Inside a direction's task BLAS runs single-threaded (SingleThreadedBlas); outside, MKL
  // threads over at::get_num_threads() cores while the AVX2 kernel uses one.
  const int blas_threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // Shapes measured at m rounded up to a power of two: the projection's chunk height varies
  // with the batch's total length, and one measurement per height would cost more than it saves.
  int64_t m = 1;
  while (m < max_m) m *= 2;
  const Key key{k, n, m, blas_threads};
  std::lock_guard<std::mutex> lock(choices_mutex());  // one measurement at a time, each once
  auto found = choices().find(key);
  if (found == choices().end()) found = choices().emplace(key, measure(k, n, m, blas_threads)).first;
  return found->second.kernel;
}

RightKernel bf16_kernel() {
  if (amx_bf16_gemm::available()) return RightKernel::AmxBf16;
  if (avx512_bf16_gemm::available()) return RightKernel::Avx512Bf16;
  return avx2_gemm::available() ? RightKernel::Avx2 : RightKernel::Gemm;
}

const char* bf16_kernel_name(RightKernel kernel) {
  return kernel == RightKernel::AmxBf16 ? "amx_bf16" : kernel == RightKernel::Avx512Bf16 ? "avx512_bf16" : "avx2";
}

void note_bf16_kernel(int64_t k, int64_t n, RightKernel kernel) {
  std::lock_guard<std::mutex> lock(choices_mutex());
  auto& line = bf16_lines()[{k, n}];
  if (!line.empty()) return;
  char text[120];
  std::snprintf(text, sizeof text, "bf16 k=%lld n=%lld: %s", static_cast<long long>(k), static_cast<long long>(n),
                bf16_kernel_name(kernel));
  line = text;
}

std::vector<std::string> float_kernel_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex());
  std::vector<std::string> lines;
  for (const auto& entry : choices()) lines.push_back(entry.second.line);
  for (const auto& entry : bf16_lines()) lines.push_back(entry.second);
  return lines;
}

}  // namespace fastner::cpu::rnn
