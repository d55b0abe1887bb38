// crf_log_likelihood (schema and conventions: csrc/fastner.cpp): reduce(gold_score - log_z)
// over the batch, for every device. Two kernels, and the op's only autograd formula:
// - CompositeExplicitAutograd: the value (crf_forward, then the reduction). Serves inference,
//   CPU, CUDA and meta/fake tensors alike.
// - Autograd: a torch::autograd::Function. When a reduced likelihood needs a gradient and the
//   device has crf_forward_backward (CPU), forward computes the gradients in the same pass and
//   backward only scales them; otherwise forward runs crf_forward and backward crf_backward
//   with per-sequence weights.
//
// Why C++ and not a Python torch.autograd.Function (which held this formula before): a CRF
// training step at NER sizes spends more time in autograd plumbing than in the kernel, and the
// Python formula's plumbing (Function.apply, a Python backward, _foreach_mul's four dispatches)
// cost ~40 us more per step (B=32, T=40, K=17: 292.5 -> 252.8 us, Zen 2, 1 thread; figures in
// fastner/ops/_autograd.py). Eager calls, torch.compile, torch.export and opcheck all reach
// this kernel through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastner::cpu::crf {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOp = std::tuple<Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                             const Tensor&, const Tensor&, const Tensor&);
using BackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&);
using ForwardBackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<ForwardOp>& forward_op() {
  static const auto handle = typed_op<ForwardOp>("fastner::crf_forward");
  return handle;
}

const c10::TypedOperatorHandle<BackwardOp>& backward_op() {
  static const auto handle = typed_op<BackwardOp>("fastner::crf_backward");
  return handle;
}

const c10::TypedOperatorHandle<ForwardBackwardOp>& forward_backward_op() {
  static const auto handle = typed_op<ForwardBackwardOp>("fastner::crf_forward_backward");
  return handle;
}

// Whether crf_forward_backward has a kernel for tensors on `device` (CPU today). Kernels do not
// come and go once the library is loaded, so each answer is asked once.
bool has_forward_backward(const c10::Device& device) {
  static const bool cpu = forward_backward_op().hasKernelForDispatchKey(c10::DispatchKey::CPU);
  static const bool cuda = forward_backward_op().hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  return device.is_cpu() ? cpu : device.is_cuda() ? cuda : false;
}

enum class Reduction : int64_t { None, Sum, Mean, TokenMean };

Reduction parse_reduction(c10::string_view text) {
  if (text == "none") return Reduction::None;
  if (text == "sum") return Reduction::Sum;
  if (text == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(text == "token_mean",
                    "crf_log_likelihood: reduction must be 'none', 'sum', 'mean' or "
                    "'token_mean', got '", std::string(text), "'");
  return Reduction::TokenMean;
}

void check_ranks(const Tensor& emissions, const Tensor& tags) {
  TORCH_CHECK_VALUE(emissions.dim() == 3 && tags.dim() == 2,
                    "crf_log_likelihood: emissions must be 3-D and tags 2-D, got ",
                    emissions.dim(), " and ", tags.dim(), " dimensions");
}

// Number of tokens as a divisor (at least 1): a tensor, so that CUDA needs no host sync.
Tensor token_count(const Tensor& lengths, at::ScalarType dtype) {
  return lengths.sum().clamp_min(1).to(dtype);
}

// x divided as the reduction divides a summed likelihood: by the B sequences for 'mean', by
// `tokens` (token_count) for 'token_mean', unchanged otherwise. The one place of that rule:
// forward applies it to the summed likelihood, backward to the incoming gradient.
Tensor scaled(Reduction how, const Tensor& x, int64_t B, const Tensor& tokens) {
  if (how == Reduction::Mean) return x / static_cast<double>(std::max<int64_t>(B, 1));
  if (how == Reduction::TokenMean) return x / tokens;
  return x;
}

// The divisor of 'token_mean' (undefined for the other reductions).
Tensor tokens_for(Reduction how, const Tensor& lengths, at::ScalarType dtype) {
  return how == Reduction::TokenMean ? token_count(lengths, dtype) : Tensor();
}

Tensor reduce(Reduction how, const Tensor& llh, const Tensor& lengths) {
  if (how == Reduction::None) return llh;
  return scaled(how, llh.sum(), llh.size(0), tokens_for(how, lengths, llh.scalar_type()));
}

Tensor log_likelihood(const Tensor& emissions, const Tensor& tags, const Tensor& lengths,
                      const Tensor& transitions, const Tensor& start, const Tensor& end,
                      c10::string_view reduction, bool batch_first) {
  const Reduction how = parse_reduction(reduction);
  check_ranks(emissions, tags);
  // Time-first callers pass their own layout; crf_forward reads the transposed views.
  const Tensor em = batch_first ? emissions : emissions.transpose(0, 1);
  const Tensor tg = batch_first ? tags : tags.transpose(0, 1);
  auto [log_z, gold] = forward_op().call(em, tg, lengths, transitions, start, end);
  return reduce(how, gold - log_z, lengths);
}

// An ordinary CPU tensor, whose data are its values: no Python subclass (FakeTensor, a traced
// FunctionalTensor: no data at all), vmap wrapper, or negative / conjugate bit. Its dispatch keys
// past the autograd and autocast ones are CPU alone.
bool ordinary_cpu(const Tensor& t) {
  const c10::DispatchKeySet rest =
      t.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView - c10::autocast_dispatch_keyset;
  return rest == c10::DispatchKeySet(c10::DispatchKey::CPU);
}

// x * factor (a one-element tensor: d out / d total) for a fused gradient that backward owns (no
// one else holds x): a multiply loop in place for the dense float / double CPU tensors the kernel
// made, the operator otherwise. The same floats either way (factor cast to x's dtype, one
// multiply each). It replaced four `x * factor` (a dispatch and a TensorIterator each: ~5 us of a
// B=32 training step), then a copy per gradient into a fresh tensor (the multiply in place
// saves the four allocations and a second pass over [B, T, K] floats).
Tensor scaled_in_place(Tensor x, const Tensor& factor) {
  const auto dtype = x.scalar_type();
  if (!ordinary_cpu(x) || !ordinary_cpu(factor) || factor.numel() != 1 ||
      !x.is_non_overlapping_and_dense() || (dtype != at::kFloat && dtype != at::kDouble)) {
    return x * factor;
  }
  double f = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, factor.scalar_type(), "crf_scale_factor", [&] {
    f = static_cast<double>(*factor.const_data_ptr<scalar_t>());
  });
  AT_DISPATCH_FLOATING_TYPES(dtype, "crf_scale_gradient", [&] {
    const scalar_t by = static_cast<scalar_t>(f);
    // dense: numel elements in one run from the lowest address
    scalar_t* values = x.data_ptr<scalar_t>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) values[i] *= by;
  });
  return x;
}

// The saved fused gradient `key`, taken out of ctx (an undefined tensor when an earlier backward
// through a retained graph took it).
Tensor take_saved(AutogradContext* ctx, const char* key) {
  const auto found = ctx->saved_data.find(key);
  if (found == ctx->saved_data.end() || !found->second.isTensor()) return Tensor();
  Tensor x = std::move(found->second).toTensor();
  found->second = c10::IValue();
  return x;
}

// The argument order of apply() is the schema's, so backward returns one entry per argument.
class LogLikelihood : public torch::autograd::Function<LogLikelihood> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& emissions, const Tensor& tags,
                        const Tensor& lengths, const Tensor& transitions, const Tensor& start,
                        const Tensor& end, c10::string_view reduction, bool batch_first) {
    const Reduction how = parse_reduction(reduction);
    check_ranks(emissions, tags);
    ctx->set_materialize_grads(false);
    const Tensor em = batch_first ? emissions : emissions.transpose(0, 1);
    const Tensor tg = batch_first ? tags : tags.transpose(0, 1);
    const int64_t B = em.size(0);
    ctx->saved_data["reduction"] = static_cast<int64_t>(how);
    ctx->saved_data["batch_first"] = batch_first;
    // A reduced likelihood weighs every sequence alike, so its gradients come from this same
    // pass (one kernel call) and backward only multiplies them by d out / d total.
    const bool fused = how != Reduction::None && has_forward_backward(em.device());
    ctx->saved_data["fused"] = fused;
    ctx->saved_data["batch"] = B;
    const Tensor tokens = tokens_for(how, lengths, transitions.scalar_type());
    if (tokens.defined()) ctx->saved_data["tokens"] = tokens;
    // The inputs as given (the non-fused backward reads them; a gradient of a gradient
    // recomputes from them): references, no copies.
    ctx->save_for_backward({emissions, tags, lengths, transitions, start, end});
    if (fused) {
      auto [total, grad_emissions, grad_transitions, grad_start, grad_end] =
          forward_backward_op().call(em, tg, lengths, transitions, start, end);
      if (!batch_first) grad_emissions = grad_emissions.transpose(0, 1);
      // Results of this call, neither inputs nor outputs: kept as they are (save_for_backward's
      // version checks guard tensors a caller could modify; nobody else holds these, so the
      // backward that takes them may scale them in place).
      ctx->saved_data["grad_emissions"] = grad_emissions;
      ctx->saved_data["grad_transitions"] = grad_transitions;
      ctx->saved_data["grad_start"] = grad_start;
      ctx->saved_data["grad_end"] = grad_end;
      return scaled(how, total, B, tokens);
    }
    auto [log_z, gold] = forward_op().call(em, tg, lengths, transitions, start, end);
    const Tensor llh = gold - log_z;
    return how == Reduction::None ? llh : scaled(how, llh.sum(), B, tokens);
  }

  // backward with a graph (create_graph=True: a gradient of a gradient, as in gradient
  // penalties). The fused gradients above are plain numbers with no graph: autograd would take
  // their derivative as zero or refuse it. Instead the likelihood is computed again through
  // crf_forward, whose autograd formula differentiates twice (fastner/ops/crf.py), and
  // differentiated with a graph, at the speed of that path.
  static variable_list differentiable_backward(AutogradContext* ctx, const Tensor& grad, Reduction how,
                                               bool batch_first) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& lengths = saved[2];
    const std::vector<int64_t> slots = {0, 3, 4, 5};  // emissions, transitions, start, end
    const std::vector<Tensor> inputs = {saved[0], saved[3], saved[4], saved[5]};
    std::vector<Tensor> wanted;
    std::vector<size_t> wanted_at;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i].requires_grad()) wanted.push_back(inputs[i]), wanted_at.push_back(i);
    }
    variable_list out(8);
    if (wanted.empty()) return out;
    // the batch-first views made here, under grad mode, so that the graph reaches the inputs
    const Tensor em = batch_first ? saved[0] : saved[0].transpose(0, 1);
    const Tensor tg = batch_first ? saved[1] : saved[1].transpose(0, 1);
    auto [log_z, gold] = forward_op().call(em, tg, lengths, saved[3], saved[4], saved[5]);
    const Tensor llh = reduce(how, gold - log_z, lengths);
    const variable_list grads = torch::autograd::grad({llh}, wanted, {grad}, /*retain_graph=*/true,
                                                      /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t n = 0; n < wanted.size(); ++n) out[slots[wanted_at[n]]] = grads[n];
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad = grad_outputs[0];
    variable_list out(8);
    if (!grad.defined()) return out;
    const auto how = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
    const bool batch_first = ctx->saved_data["batch_first"].toBool();
    const int64_t B = ctx->saved_data["batch"].toInt();
    const Tensor tokens = how == Reduction::TokenMean ? ctx->saved_data["tokens"].toTensor() : Tensor();
    if (at::GradMode::is_enabled()) return differentiable_backward(ctx, grad, how, batch_first);
    // d out / d total for a reduced likelihood (total = sum_b llh_b).
    const Tensor factor = how == Reduction::None ? Tensor() : scaled(how, grad, B, tokens);
    if (ctx->saved_data["fused"].toBool()) {
      // The first backward owns the forward pass's gradients and scales them in place; a later
      // one (through a retained graph) finds them taken and recomputes them with the same kernel
      // on the same inputs: the same floats (the lane and exact kernels are deterministic and do
      // not depend on the thread count).
      Tensor grad_emissions = take_saved(ctx, "grad_emissions");
      Tensor grad_transitions = take_saved(ctx, "grad_transitions");
      Tensor grad_start = take_saved(ctx, "grad_start");
      Tensor grad_end = take_saved(ctx, "grad_end");
      if (!grad_emissions.defined()) {
        const variable_list saved = ctx->get_saved_variables();
        const Tensor em = batch_first ? saved[0] : saved[0].transpose(0, 1);
        const Tensor tg = batch_first ? saved[1] : saved[1].transpose(0, 1);
        Tensor total;
        std::tie(total, grad_emissions, grad_transitions, grad_start, grad_end) =
            forward_backward_op().call(em, tg, saved[2], saved[3], saved[4], saved[5]);
        if (!batch_first) grad_emissions = grad_emissions.transpose(0, 1);
      }
      out[0] = scaled_in_place(std::move(grad_emissions), factor);
      out[3] = scaled_in_place(std::move(grad_transitions), factor);
      out[4] = scaled_in_place(std::move(grad_start), factor);
      out[5] = scaled_in_place(std::move(grad_end), factor);
      return out;
    }
    const variable_list saved = ctx->get_saved_variables();
    const Tensor em = batch_first ? saved[0] : saved[0].transpose(0, 1);
    const Tensor tg = batch_first ? saved[1] : saved[1].transpose(0, 1);
    // d out / d llh_b per sequence: grad itself ([B], 'none'), else d out / d total spread over
    // B (the kernels read stride-0 tensors as they are).
    const Tensor weight = how == Reduction::None ? grad : factor.expand({B});
    auto [grad_emissions, grad_transitions, grad_start, grad_end] =
        backward_op().call(-weight, weight, em, tg, saved[2], saved[3], saved[4], saved[5]);
    out[0] = batch_first ? grad_emissions : grad_emissions.transpose(0, 1);
    out[3] = grad_transitions;
    out[4] = grad_start;
    out[5] = grad_end;
    return out;
  }
};

Tensor log_likelihood_autograd(const Tensor& emissions, const Tensor& tags, const Tensor& lengths,
                               const Tensor& transitions, const Tensor& start, const Tensor& end,
                               c10::string_view reduction, bool batch_first) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (emissions.requires_grad() || transitions.requires_grad() ||
                           start.requires_grad() || end.requires_grad());
  if (!needs_grad) {  // the value alone: no graph node, no gradients computed on the way
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return log_likelihood(emissions, tags, lengths, transitions, start, end, reduction, batch_first);
  }
  return LogLikelihood::apply(emissions, tags, lengths, transitions, start, end, reduction,
                              batch_first);
}

}  // namespace
}  // namespace fastner::cpu::crf

TORCH_LIBRARY_IMPL(fastner, CompositeExplicitAutograd, m) {
  m.impl("crf_log_likelihood", &fastner::cpu::crf::log_likelihood);
}

TORCH_LIBRARY_IMPL(fastner, Autograd, m) {
  m.impl("crf_log_likelihood", &fastner::cpu::crf::log_likelihood_autograd);
}
