// C++ smoke test of the libtorch build: the ops are registered and give sane numbers.
// Run by ctest (see CMakeLists.txt).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <tuple>

static int failures = 0;

static void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAIL", what);
  if (!ok) ++failures;
}

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

static c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const char* name : {"fastner::crf_forward", "fastner::crf_backward", "fastner::crf_viterbi",
                           "fastner::crf_kbest", "fastner::crf_marginals", "fastner::crf_lengths"}) {
    check(dispatcher.findSchema({name, ""}).has_value(), name);
  }
  auto forward = op("fastner::crf_forward")
                     .typed<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                       const Tensor&, const Tensor&, const Tensor&)>();
  auto backward = op("fastner::crf_backward")
                      .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                          const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  auto viterbi = op("fastner::crf_viterbi")
                     .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&)>();
  auto kbest = op("fastner::crf_kbest")
                   .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                     const Tensor&, const Tensor&, int64_t)>();
  auto marginals = op("fastner::crf_marginals")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&)>();
  auto lengths_of = op("fastner::crf_lengths").typed<Tensor(const Tensor&, bool)>();

  // One sequence, two tags, zero scores everywhere: log Z = T * log 2.
  {
    const int64_t T = 5, K = 2;
    auto emissions = torch::zeros({1, T, K});
    auto lengths = torch::full({1}, T, torch::kLong);
    auto transitions = torch::zeros({K, K});
    auto start = torch::zeros({K});
    auto end = torch::zeros({K});
    auto result = forward.call(emissions, std::nullopt, lengths, transitions, start, end);
    double log_z = std::get<0>(result).item<double>();
    check(std::abs(log_z - T * std::log(2.0)) < 1e-5, "crf_forward log Z of a uniform chain");
    auto m = marginals.call(emissions, lengths, transitions, start, end);
    check(torch::allclose(m, torch::full_like(m, 0.5)), "crf_marginals of a uniform chain are 1/K");
  }

  // A small random batch: checks that tie the ops to each other.
  torch::manual_seed(0);
  const int64_t B = 3, T = 6, K = 4;
  auto emissions = torch::randn({B, T, K}, torch::kDouble);
  auto transitions = torch::randn({K, K}, torch::kDouble);
  auto start = torch::randn({K}, torch::kDouble);
  auto end = torch::randn({K}, torch::kDouble);
  auto mask = torch::tensor({1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}, torch::kBool)
                  .reshape({B, T});
  auto lengths = lengths_of.call(mask, true);
  check(torch::equal(lengths, torch::tensor({6, 3, 0}, torch::kLong)), "crf_lengths of a mask");
  bool gap_raises = false;
  try {
    lengths_of.call(torch::tensor({1, 0, 1}, torch::kBool).reshape({1, 3}), true);
  } catch (const c10::ValueError&) {
    gap_raises = true;
  }
  check(gap_raises, "crf_lengths raises ValueError on a mask with a gap");

  auto [vtags, vscores] = viterbi.call(emissions, lengths, transitions, start, end);
  auto [log_z, gold] = forward.call(emissions, vtags.clamp_min(0), lengths, transitions, start, end);
  check(torch::allclose(gold, vscores), "the Viterbi path scores what crf_viterbi says");
  check((vscores <= log_z + 1e-12).all().item<bool>(), "best path score <= log Z");
  check(log_z[2].item<double>() == 0.0 && vtags[2].eq(-1).all().item<bool>(),
        "a sequence of length 0: log Z 0, no tags");
  auto [ktags, kscores] = kbest.call(emissions, lengths, transitions, start, end, 3);
  check(torch::allclose(kscores.select(1, 0), vscores) && torch::equal(ktags.select(1, 0), vtags),
        "crf_kbest's best path is Viterbi's");
  auto m = marginals.call(emissions, lengths, transitions, start, end);
  auto ones = torch::ones({B, T}, torch::kDouble) * mask.to(torch::kDouble);
  check(torch::allclose(m.sum(2), ones), "marginals sum to 1 inside each length, 0 past it");

  // d log Z / d emissions = marginals; the gold term adds the gold path's one-hot.
  auto g = backward.call(torch::ones({B}, torch::kDouble), torch::zeros({B}, torch::kDouble),
                         emissions, std::nullopt, lengths, transitions, start, end);
  check(torch::allclose(std::get<0>(g), m), "crf_backward: grad of log Z w.r.t. emissions");
  check(std::abs(std::get<1>(g).sum().item<double>() - 5.0 - 2.0) < 1e-9,
        "crf_backward: transition gradient sums to the number of transitions");

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
