// crf_log_likelihood's value, for every device (schema and conventions: csrc/fastner.cpp):
// the reduced log-likelihood reduce(gold_score - log_z) of crf_forward, registered as the op's
// CompositeExplicitAutograd kernel, so it serves CPU, CUDA and meta/fake tensors alike. Its
// autograd formula is fastner/ops/crf.py's (one Python kernel at the Autograd key; a C++
// torch::autograd::Function measured slower per call, see fastner/ops/_autograd.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastner::cpu::crf {
namespace {

using at::Tensor;

using ForwardOp = std::tuple<Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                             const Tensor&, const Tensor&, const Tensor&);

Tensor log_likelihood(const Tensor& emissions, const Tensor& tags, const Tensor& lengths,
                      const Tensor& transitions, const Tensor& start, const Tensor& end,
                      c10::string_view reduction, bool batch_first) {
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("fastner::crf_forward", "")
                                  .typed<ForwardOp>();
  TORCH_CHECK_VALUE(reduction == "none" || reduction == "sum" || reduction == "mean" ||
                        reduction == "token_mean",
                    "crf_log_likelihood: reduction must be 'none', 'sum', 'mean' or "
                    "'token_mean', got '", std::string(reduction), "'");
  TORCH_CHECK_VALUE(emissions.dim() == 3 && tags.dim() == 2,
                    "crf_log_likelihood: emissions must be 3-D and tags 2-D, got ",
                    emissions.dim(), " and ", tags.dim(), " dimensions");
  // Time-first callers pass their own layout; crf_forward reads the transposed views.
  const Tensor em = batch_first ? emissions : emissions.transpose(0, 1);
  const Tensor tg = batch_first ? tags : tags.transpose(0, 1);
  auto [log_z, gold] = forward.call(em, tg, lengths, transitions, start, end);
  const Tensor llh = gold - log_z;
  if (reduction == "none") return llh;
  if (reduction == "sum") return llh.sum();
  if (reduction == "mean") return llh.mean();
  // token_mean: a tensor divisor, so that CUDA needs no host sync
  return llh.sum() / lengths.sum().clamp_min(1).to(llh.scalar_type());
}

}  // namespace
}  // namespace fastner::cpu::crf

TORCH_LIBRARY_IMPL(fastner, CompositeExplicitAutograd, m) {
  m.impl("crf_log_likelihood", &fastner::cpu::crf::log_likelihood);
}
