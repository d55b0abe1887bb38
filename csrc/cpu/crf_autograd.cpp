// PROTOTYPE (issue 13, phase 1 measurement): the CRF log-likelihood's autograd formula in C++, a
// kernel at the Autograd dispatch key wrapping the forward and backward ops, to compare with
// the Python formula (fastner/ops.py) per call. Registers one op,
//   crf_log_likelihood(emissions, tags, lengths, transitions, start_transitions,
//                      end_transitions, str reduction, bool batch_first) -> Tensor
// = reduce(gold_score - log_z) over the batch ('none' | 'sum' | 'mean' | 'token_mean'), with
// emissions [B, T, K] ([T, B, K] when not batch_first) and tags in the same layout without K.
//
// Kernels: CompositeExplicitAutograd (the value only: crf_forward, then the reduction; serves
// inference, meta/fake tensors and every device) and Autograd (a torch::autograd::Function:
// when a reduced likelihood needs a gradient on CPU, forward runs crf_forward_backward and
// backward only scales its gradients; otherwise forward runs crf_forward and backward
// crf_backward with per-sequence weights).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastner {
namespace crf {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                     const Tensor&, const Tensor&, const Tensor&,
                                                     const Tensor&);
using BackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using ForwardBackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<ForwardOp>& forward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastner::crf_forward", "")
                                 .typed<ForwardOp>();
  return handle;
}

const c10::TypedOperatorHandle<BackwardOp>& backward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastner::crf_backward", "")
                                 .typed<BackwardOp>();
  return handle;
}

const c10::TypedOperatorHandle<ForwardBackwardOp>& forward_backward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastner::crf_forward_backward", "")
                                 .typed<ForwardBackwardOp>();
  return handle;
}

enum class Reduction { None, Sum, Mean, TokenMean };

Reduction parse_reduction(c10::string_view text) {
  if (text == "none") return Reduction::None;
  if (text == "sum") return Reduction::Sum;
  if (text == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(text == "token_mean",
                    "crf_log_likelihood: reduction must be 'none', 'sum', 'mean' or "
                    "'token_mean', got '", std::string(text), "'");
  return Reduction::TokenMean;
}

// The factor a summed likelihood is multiplied by: none for 'sum', 1/B for 'mean', 1/tokens
// (a tensor, so that CUDA needs no host sync) for 'token_mean'.
std::optional<Tensor> reduction_scale(Reduction reduction, const Tensor& lengths,
                                      int64_t batch, const at::TensorOptions& options) {
  if (reduction == Reduction::Mean) {
    return at::scalar_tensor(1.0 / static_cast<double>(std::max<int64_t>(batch, 1)), options);
  }
  if (reduction == Reduction::TokenMean) {
    return lengths.sum().clamp_min(1).to(options.dtype()).reciprocal();
  }
  return std::nullopt;
}

Tensor reduce(Reduction reduction, const Tensor& llh, const Tensor& lengths) {
  switch (reduction) {
    case Reduction::None: return llh;
    case Reduction::Sum: return llh.sum();
    case Reduction::Mean: return llh.mean();
    case Reduction::TokenMean: return llh.sum() / lengths.sum().clamp_min(1).to(llh.scalar_type());
  }
  return llh;
}

// The value, for every dispatch key below Autograd (CPU, CUDA, Meta, fake tensors).
Tensor log_likelihood_value(const Tensor& emissions, const Tensor& tags, const Tensor& lengths,
                            const Tensor& transitions, const Tensor& start, const Tensor& end,
                            c10::string_view reduction, bool batch_first) {
  const Reduction how = parse_reduction(reduction);
  const Tensor em = batch_first ? emissions : emissions.transpose(0, 1);
  const Tensor tg = batch_first ? tags : tags.transpose(0, 1);
  auto [log_z, gold, alphas] = forward_op().call(em, tg, lengths, transitions, start, end);
  return reduce(how, gold - log_z, lengths);
}

class LogLikelihood : public torch::autograd::Function<LogLikelihood> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& emissions,
                        const Tensor& transitions, const Tensor& start, const Tensor& end,
                        const Tensor& tags, const Tensor& lengths, c10::string_view reduction,
                        bool batch_first) {
    const Reduction how = parse_reduction(reduction);
    ctx->set_materialize_grads(false);
    const Tensor em = batch_first ? emissions : emissions.transpose(0, 1);
    const Tensor tg = batch_first ? tags : tags.transpose(0, 1);
    const bool needs_grad = at::GradMode::is_enabled() && (emissions.requires_grad() || transitions.requires_grad() ||
                            start.requires_grad() || end.requires_grad());
    ctx->saved_data["batch_first"] = batch_first;
    ctx->saved_data["reduction"] = static_cast<int64_t>(how);
    // A reduced likelihood weighs every sequence alike, so its gradients can be computed in
    // this same pass (crf_forward_backward, CPU) and backward only scales them.
    const bool fused = needs_grad && how != Reduction::None && em.device().is_cpu();
    ctx->saved_data["fused"] = fused;
    const auto scale = reduction_scale(how, lengths, em.size(0), transitions.options());
    if (fused) {
      auto [total, grad_emissions, grad_transitions, grad_start, grad_end] =
          forward_backward_op().call(em, tg, lengths, transitions, start, end);
      if (!batch_first) grad_emissions = grad_emissions.transpose(0, 1);
      Tensor out = scale.has_value() ? total * *scale : total;
      Tensor scale_saved = scale.has_value() ? *scale : Tensor();
      ctx->save_for_backward({grad_emissions, grad_transitions, grad_start, grad_end,
                              scale_saved});
      return out;
    }
    auto [log_z, gold, alphas] = forward_op().call(em, tg, lengths, transitions, start, end);
    Tensor llh = gold - log_z;
    Tensor scale_saved = scale.has_value() ? *scale : Tensor();
    ctx->save_for_backward({em, tg, lengths, transitions, start, end, log_z, alphas,
                            scale_saved});
    return reduce(how, llh, lengths);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad = grad_outputs[0];
    variable_list none(8);
    if (!grad.defined()) return none;
    const bool batch_first = ctx->saved_data["batch_first"].toBool();
    const auto how = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
    auto saved = ctx->get_saved_variables();
    if (ctx->saved_data["fused"].toBool()) {
      const Tensor& scale = saved[4];
      const Tensor factor = scale.defined() ? grad * scale : grad;
      auto grads = at::_foreach_mul({saved[0], saved[1], saved[2], saved[3]}, factor);
      return {grads[0], grads[1], grads[2], grads[3], Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const Tensor& log_z = saved[6];
    const Tensor& scale = saved[8];
    const int64_t batch = log_z.size(0);
    // d out / d llh_b per sequence: grad itself ([B], 'none'), else the scalar spread over B.
    Tensor weight = how == Reduction::None ? grad
                    : scale.defined()      ? (grad * scale).expand({batch})
                                           : grad.expand({batch});
    auto [grad_emissions, grad_transitions, grad_start, grad_end] = backward_op().call(
        -weight, weight, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], log_z,
        saved[7]);
    if (!batch_first) grad_emissions = grad_emissions.transpose(0, 1);
    return {grad_emissions, grad_transitions, grad_start, grad_end,
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor log_likelihood_autograd(const Tensor& emissions, const Tensor& tags, const Tensor& lengths,
                               const Tensor& transitions, const Tensor& start, const Tensor& end,
                               c10::string_view reduction, bool batch_first) {
  return LogLikelihood::apply(emissions, transitions, start, end, tags, lengths, reduction,
                              batch_first);
}

}  // namespace
}  // namespace crf
}  // namespace fastner

TORCH_LIBRARY_FRAGMENT(fastner, m) {
  m.def("crf_log_likelihood(Tensor emissions, Tensor tags, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions, str reduction, bool batch_first) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastner, CompositeExplicitAutograd, m) {
  m.impl("crf_log_likelihood", &fastner::crf::log_likelihood_value);
}

TORCH_LIBRARY_IMPL(fastner, Autograd, m) {
  m.impl("crf_log_likelihood", &fastner::crf::log_likelihood_autograd);
}
