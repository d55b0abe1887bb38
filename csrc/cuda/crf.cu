// CUDA kernels of the CRF ops (schemas: csrc/fastner.cpp, CRF block): input checks, output and
// scratch allocation, launches on the current stream. The device code is
// csrc/cuda/kernels/crf.cuh (torch-free); the CPU kernels are csrc/cpu/crf.cpp, whose checks
// these mirror.
//
// What differs from the CPU kernels, and why: the CPU kernels reject a length outside [0, T] and
// a tag outside [0, K) with a ValueError after reading them. Here lengths and tags live on the
// GPU and reading them would cost a device->host sync per call (the decode target is ~30 us for
// a sentence), so the kernels check them per sequence and poison that sequence's results with
// NaN (tags -1) instead of raising. Everything checkable from metadata (shapes, dtypes, devices)
// raises exactly as on CPU. K is limited to 1024 tags (one thread per tag, one block at most).
//
// No host sync anywhere: every launch is asynchronous on the current stream
// (c10::cuda::getCurrentCUDAStream(), which at::cuda::getCurrentCUDAStream() re-exports); the
// only host work is allocation through the caching allocator (outputs, plus scratch for
// Viterbi backpointers that do not fit in shared memory, k-best backpointers and the
// per-group partial sums of the parameter gradients, and crf_backward's recomputed forward pass).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <type_traits>

#include "checks.h"
#include "cuda/kernels/crf.cuh"

namespace fastner::cuda::crf {
namespace {

namespace k = kernels;  // the torch-free device code, csrc/cuda/kernels/crf.cuh

using at::Tensor;

at::ScalarType accumulate_type(at::ScalarType emissions) {
  return emissions == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls f(static_cast<E*>(nullptr)) with E the device type of the emissions' dtype.
template <typename F>
void dispatch_emissions(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case at::kDouble:
      f(static_cast<double*>(nullptr));
      break;
    case at::kHalf:
      f(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      f(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK_VALUE(false, op, ": emissions must be float32, float64, float16 or bfloat16, got ", dtype);
  }
}

template <typename T>
const T* ptr(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mut_ptr(Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// Read per call with cudaDeviceGetAttribute (a cheap host query, no sync) rather than
// at::cuda::getCurrentDeviceProperties(), so that this file includes only c10/cuda headers.
k::DeviceLimits device_limits() {
  const int device = c10::cuda::current_device();
  int num_sms = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return k::DeviceLimits{num_sms, static_cast<size_t>(smem_optin)};
}

// The shared metadata checks (csrc/checks.h) plus the CUDA-only rules: the emissions on a CUDA
// device and the limit on K. Values of lengths and tags are checked on the device (see the file
// comment).
void check_inputs(const char* op, const Tensor& emissions, const Tensor& lengths, const Tensor& transitions,
                  const Tensor& start, const Tensor& end) {
  checks::crf_inputs(op, emissions, lengths, transitions, start, end);
  TORCH_CHECK_VALUE(emissions.is_cuda(), op, ": emissions must be on a CUDA device, got ", emissions.device());
  const int64_t K = emissions.size(2);
  TORCH_CHECK_VALUE(K <= k::kMaxTags, op, ": the CUDA kernels support at most ", k::kMaxTags, " tags, got K = ", K,
                    " (run this CRF on the CPU)");
}

void check_tags(const char* op, const Tensor& tags, const Tensor& emissions) {
  checks::crf_tags(op, tags, emissions);
}

at::TensorOptions acc_options(const Tensor& emissions) {
  return emissions.options().dtype(accumulate_type(emissions.scalar_type()));
}

// ---- crf_forward ------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> crf_forward_cuda(const Tensor& emissions_in, const std::optional<Tensor>& tags_in,
                                            const Tensor& lengths_in, const Tensor& transitions_in,
                                            const Tensor& start_in, const Tensor& end_in) {
  check_inputs("crf_forward", emissions_in, lengths_in, transitions_in, start_in, end_in);
  const c10::cuda::CUDAGuard guard(emissions_in.device());
  const Tensor emissions = emissions_in.contiguous();  // [B, T, K], read in its own dtype
  const Tensor lengths = lengths_in.contiguous();
  const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(), end = end_in.contiguous();
  Tensor tags;
  if (tags_in.has_value()) {
    check_tags("crf_forward", *tags_in, emissions);
    tags = tags_in->contiguous();
  }
  const int64_t B = emissions.size(0), T = emissions.size(1);
  const int K = static_cast<int>(emissions.size(2));
  Tensor log_z = at::empty({B}, acc_options(emissions));
  Tensor gold = at::empty({B}, acc_options(emissions));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_emissions(emissions.scalar_type(), "crf_forward", [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<E>;
    C10_CUDA_CHECK(k::launch_forward<E>(ptr<E>(emissions), tags.defined() ? ptr<int64_t>(tags) : nullptr,
                                     ptr<int64_t>(lengths), ptr<A>(transitions), ptr<A>(start), ptr<A>(end),
                                     mut_ptr<A>(log_z), mut_ptr<A>(gold), nullptr, B, T, K, stream));
  });
  return {log_z, gold};
}

// ---- crf_backward -----------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> crf_backward_cuda(
    const Tensor& grad_log_z_in, const Tensor& grad_gold_in, const Tensor& emissions_in,
    const std::optional<Tensor>& tags_in, const Tensor& lengths_in, const Tensor& transitions_in,
    const Tensor& start_in, const Tensor& end_in) {
  check_inputs("crf_backward", emissions_in, lengths_in, transitions_in, start_in, end_in);
  const c10::cuda::CUDAGuard guard(emissions_in.device());
  const int64_t B = emissions_in.size(0), T = emissions_in.size(1);
  const int K = static_cast<int>(emissions_in.size(2));
  for (const Tensor* t : {&grad_log_z_in, &grad_gold_in}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B,
                      "crf_backward: grad_log_z and grad_gold_score must be [B] = [", B, "], got ", t->sizes());
  }
  const std::pair<const char*, const Tensor*> incoming[] = {{"grad_log_z", &grad_log_z_in},
                                                            {"grad_gold_score", &grad_gold_in}};
  for (const auto& [name, t] : incoming) {
    TORCH_CHECK_VALUE(t->is_floating_point(), "crf_backward: ", name, " must be floating point, got ",
                      t->scalar_type());
    checks::on_device("crf_backward", name, *t, emissions_in.device());
  }
  Tensor tags;
  if (tags_in.has_value()) {
    check_tags("crf_backward", *tags_in, emissions_in);
    tags = tags_in->contiguous();
  }
  const auto acc = accumulate_type(emissions_in.scalar_type());
  const Tensor emissions = emissions_in.contiguous();
  const Tensor lengths = lengths_in.contiguous();
  const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(), end = end_in.contiguous();
  // As on CPU: the incoming gradients are taken in the accumulate dtype.
  const Tensor grad_log_z = grad_log_z_in.to(acc).contiguous();
  const Tensor grad_gold = grad_gold_in.to(acc).contiguous();
  Tensor grad_emissions = at::empty({B, T, K}, emissions.options());  // emissions' own dtype
  Tensor grad_transitions = at::empty({K, K}, acc_options(emissions));
  Tensor grad_start = at::empty({K}, acc_options(emissions));
  Tensor grad_end = at::empty({K}, acc_options(emissions));
  const int64_t P = k::backward_partial_count(B, K, device_limits());
  Tensor partials = at::empty({P, k::partial_width(K)}, acc_options(emissions));  // scratch
  // The forward pass's alphas and log Z, recomputed by launch_backward (crf_forward keeps nothing).
  Tensor forward_scratch = at::empty({k::backward_forward_scratch(B, T, K)}, acc_options(emissions));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_emissions(emissions.scalar_type(), "crf_backward", [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<E>;
    C10_CUDA_CHECK(k::launch_backward<E>(ptr<A>(grad_log_z), ptr<A>(grad_gold), ptr<E>(emissions),
                                      tags.defined() ? ptr<int64_t>(tags) : nullptr, ptr<int64_t>(lengths),
                                      ptr<A>(transitions), ptr<A>(start), ptr<A>(end), mut_ptr<E>(grad_emissions),
                                      mut_ptr<A>(grad_transitions), mut_ptr<A>(grad_start), mut_ptr<A>(grad_end),
                                      mut_ptr<A>(forward_scratch), mut_ptr<A>(partials), P, B, T, K, stream));
  });
  return {grad_emissions, grad_transitions, grad_start, grad_end};
}

// ---- crf_viterbi ------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> crf_viterbi_cuda(const Tensor& emissions_in, const Tensor& lengths_in,
                                            const Tensor& transitions_in, const Tensor& start_in,
                                            const Tensor& end_in) {
  check_inputs("crf_viterbi", emissions_in, lengths_in, transitions_in, start_in, end_in);
  const c10::cuda::CUDAGuard guard(emissions_in.device());
  const Tensor emissions = emissions_in.contiguous();
  const Tensor lengths = lengths_in.contiguous();
  const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(), end = end_in.contiguous();
  const int64_t B = emissions.size(0), T = emissions.size(1);
  const int K = static_cast<int>(emissions.size(2));
  Tensor tags = at::empty({B, T}, lengths.options());
  Tensor scores = at::empty({B}, acc_options(emissions));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_emissions(emissions.scalar_type(), "crf_viterbi", [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<E>;
    const size_t scratch_bytes = k::viterbi_scratch_bytes<A>(B, T, K);
    Tensor scratch;  // backpointers [B, T, K] when they do not fit in shared memory
    if (scratch_bytes > 0) {
      scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, emissions.options().dtype(at::kByte));
    }
    C10_CUDA_CHECK(k::launch_viterbi<E>(ptr<E>(emissions), ptr<int64_t>(lengths), ptr<A>(transitions),
                                     ptr<A>(start), ptr<A>(end), mut_ptr<int64_t>(tags), mut_ptr<A>(scores),
                                     scratch.defined() ? scratch.mutable_data_ptr() : nullptr, B, T, K, stream));
  });
  return {tags, scores};
}

// ---- crf_kbest --------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> crf_kbest_cuda(const Tensor& emissions_in, const Tensor& lengths_in,
                                          const Tensor& transitions_in, const Tensor& start_in,
                                          const Tensor& end_in, int64_t k) {
  check_inputs("crf_kbest", emissions_in, lengths_in, transitions_in, start_in, end_in);
  TORCH_CHECK_VALUE(k >= 1, "crf_kbest: k must be >= 1, got ", k);
  const int64_t B = emissions_in.size(0), T = emissions_in.size(1);
  const int K = static_cast<int>(emissions_in.size(2));
  // Candidate indices i * k + r are int32 on the device.
  TORCH_CHECK_VALUE(k <= std::numeric_limits<int32_t>::max() / K, "crf_kbest: k * K must be below 2^31, got k = ",
                    k, ", K = ", K);
  const c10::cuda::CUDAGuard guard(emissions_in.device());
  const k::DeviceLimits dev = device_limits();
  {
    int gpb = 1;
    size_t smem = 0;
    bool stage = false;
    if (emissions_in.scalar_type() == at::kDouble) {
      k::kbest_shape<double>(B, K, k, dev, &gpb, &smem, &stage);
    } else {
      k::kbest_shape<float>(B, K, k, dev, &gpb, &smem, &stage);
    }
    TORCH_CHECK_VALUE(smem > 0, "crf_kbest: k = ", k, " best lists for K = ", K,
                      " tags need more shared memory than this GPU has (", dev.smem_optin_bytes,
                      " bytes per block); use a smaller k or the CPU");
  }
  const Tensor emissions = emissions_in.contiguous();
  const Tensor lengths = lengths_in.contiguous();
  const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(), end = end_in.contiguous();
  Tensor tags = at::empty({B, k, T}, lengths.options());
  Tensor scores = at::empty({B, k}, acc_options(emissions));
  Tensor backpointers = at::empty({B, T, K, k}, lengths.options().dtype(at::kInt));  // scratch
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_emissions(emissions.scalar_type(), "crf_kbest", [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<E>;
    C10_CUDA_CHECK(k::launch_kbest<E>(ptr<E>(emissions), ptr<int64_t>(lengths), ptr<A>(transitions), ptr<A>(start),
                                   ptr<A>(end), mut_ptr<int64_t>(tags), mut_ptr<A>(scores),
                                   mut_ptr<int32_t>(backpointers), B, T, K, static_cast<int>(k), dev, stream));
  });
  return {tags, scores};
}

// ---- crf_marginals ----------------------------------------------------------------------------

Tensor crf_marginals_cuda(const Tensor& emissions_in, const Tensor& lengths_in, const Tensor& transitions_in,
                          const Tensor& start_in, const Tensor& end_in) {
  check_inputs("crf_marginals", emissions_in, lengths_in, transitions_in, start_in, end_in);
  const c10::cuda::CUDAGuard guard(emissions_in.device());
  const Tensor emissions = emissions_in.contiguous();
  const Tensor lengths = lengths_in.contiguous();
  const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(), end = end_in.contiguous();
  const int64_t B = emissions.size(0), T = emissions.size(1);
  const int K = static_cast<int>(emissions.size(2));
  Tensor out = at::empty({B, T, K}, acc_options(emissions));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_emissions(emissions.scalar_type(), "crf_marginals", [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<E>;
    C10_CUDA_CHECK(k::launch_marginals<E>(ptr<E>(emissions), ptr<int64_t>(lengths), ptr<A>(transitions),
                                       ptr<A>(start), ptr<A>(end), mut_ptr<A>(out), B, T, K, stream));
  });
  return out;
}

}  // namespace
}  // namespace fastner::cuda::crf

TORCH_LIBRARY_IMPL(fastner, CUDA, m) {
  m.impl("crf_forward", &fastner::cuda::crf::crf_forward_cuda);
  m.impl("crf_backward", &fastner::cuda::crf::crf_backward_cuda);
  m.impl("crf_viterbi", &fastner::cuda::crf::crf_viterbi_cuda);
  m.impl("crf_kbest", &fastner::cuda::crf::crf_kbest_cuda);
  m.impl("crf_marginals", &fastner::cuda::crf::crf_marginals_cuda);
}
