// C++ smoke test of the libtorch build: the ops are registered and give sane numbers.
// Run by ctest (see CMakeLists.txt).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

static int failures = 0;

static void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAIL", what);
  if (!ok) ++failures;
}

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const char* name : {"fastner::crf_forward", "fastner::crf_backward", "fastner::crf_viterbi",
                           "fastner::crf_kbest", "fastner::crf_marginals"}) {
    check(dispatcher.findSchema({name, ""}).has_value(), name);
  }

  // One sequence, two tags, zero scores everywhere: log Z = T * log 2.
  const int64_t T = 5, K = 2;
  auto emissions = torch::zeros({1, T, K});
  auto lengths = torch::full({1}, T, torch::kLong);
  auto transitions = torch::zeros({K, K});
  auto start = torch::zeros({K});
  auto end = torch::zeros({K});
  auto forward = dispatcher.findSchemaOrThrow("fastner::crf_forward", "")
                     .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                         const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto result = forward.call(emissions, std::nullopt, lengths, transitions, start, end);
  double log_z = std::get<0>(result).item<double>();
  check(std::abs(log_z - T * std::log(2.0)) < 1e-5, "crf_forward log Z of a uniform chain");

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
