// Argument checks shared by every op binding (csrc/cpu/*.cpp and csrc/cuda/*.cu): one place for
// the rank, size, dtype, device and value-range rules of csrc/fastner.cpp's conventions, so that
// the CPU and CUDA kernels refuse exactly the same inputs with the same messages.
//
// Every check raises through TORCH_CHECK_VALUE (a Python ValueError) naming the op, the argument
// and what was expected. Checks run before a kernel touches any data.
//
// Pointer lifetime: a function here that reads values returns the tensor it read them from, so
// the caller keeps it alive for as long as it uses the pointer (never `x.contiguous().data_ptr()`
// of a temporary).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace fastner::checks {

// `t` lives on `device` (the emissions' / input's device); `what` names that device's owner.
inline void on_device(const char* op, const char* name, const at::Tensor& t, const c10::Device& device,
                      const char* what = "the emissions'") {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, " (", what,
                    " device), got ", t.device());
}

// lengths: int64 [B].
inline void lengths_shape(const char* op, const at::Tensor& lengths, int64_t B) {
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B, op, ": lengths must be [B] = [", B, "], got ",
                    lengths.sizes());
  TORCH_CHECK_VALUE(lengths.scalar_type() == at::kLong, op, ": lengths must be int64, got ", lengths.scalar_type());
}

// 0 <= lengths[b] <= T for a CPU lengths tensor (shape and dtype already checked). Returns the
// contiguous tensor the values were read from: its data_ptr stays valid while the caller holds it.
inline at::Tensor lengths_in_range(const char* op, const at::Tensor& lengths, int64_t T) {
  TORCH_CHECK_VALUE(lengths.device().is_cpu(), op, ": lengths must be on the CPU here, got ", lengths.device());
  at::Tensor held = lengths.contiguous();
  const int64_t* len = held.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < held.size(0); ++b) {
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= T, op, ": lengths[", b, "] = ", len[b], " is outside [0, T = ", T,
                      "]");
  }
  return held;
}

// The CRF ops' common arguments: emissions [B, T, K] float32/float64/float16/bfloat16 with K > 0;
// transitions [K, K], start / end [K] in `acc` (the accumulate dtype); lengths int64 [B]; every
// tensor on the emissions' device. Values (lengths in [0, T], tags in [0, K)) are the caller's
// next step: CPU kernels read them on the host, CUDA kernels on the device.
inline void crf_inputs(const char* op, const at::Tensor& emissions, const at::Tensor& lengths,
                       const at::Tensor& transitions, const at::Tensor& start, const at::Tensor& end) {
  TORCH_CHECK_VALUE(emissions.dim() == 3, op, ": emissions must be [B, T, K], got ", emissions.dim(),
                    " dimensions");
  const auto dtype = emissions.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                    op, ": emissions must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t B = emissions.size(0), K = emissions.size(2);
  TORCH_CHECK_VALUE(K > 0, op, ": emissions must have at least one tag (K > 0)");
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(transitions.dim() == 2 && transitions.size(0) == K && transitions.size(1) == K, op,
                    ": transitions must be [K, K] = [", K, ", ", K, "], got ", transitions.sizes());
  TORCH_CHECK_VALUE(start.dim() == 1 && start.size(0) == K, op, ": start_transitions must be [K] = [", K,
                    "], got ", start.sizes());
  TORCH_CHECK_VALUE(end.dim() == 1 && end.size(0) == K, op, ": end_transitions must be [K] = [", K, "], got ",
                    end.sizes());
  const std::pair<const char*, const at::Tensor*> scores[] = {
      {"transitions", &transitions}, {"start_transitions", &start}, {"end_transitions", &end}};
  for (const auto& [name, t] : scores) {
    TORCH_CHECK_VALUE(t->scalar_type() == acc, op, ": ", name, " must be ", acc, " for ", dtype,
                      " emissions, got ", t->scalar_type());
    on_device(op, name, *t, emissions.device());
  }
  lengths_shape(op, lengths, B);
  on_device(op, "lengths", lengths, emissions.device());
}

// tags: int64 [B, T] on the emissions' device (values are checked where they are read).
inline void crf_tags(const char* op, const at::Tensor& tags, const at::Tensor& emissions) {
  const int64_t B = emissions.size(0), T = emissions.size(1);
  TORCH_CHECK_VALUE(tags.dim() == 2 && tags.size(0) == B && tags.size(1) == T, op, ": tags must be [B, T] = [", B,
                    ", ", T, "], got ", tags.sizes());
  TORCH_CHECK_VALUE(tags.scalar_type() == at::kLong, op, ": tags must be int64, got ", tags.scalar_type());
  on_device(op, "tags", tags, emissions.device());
}

// A tensor argument of a fixed shape, dtype and device (e.g. a gradient, a saved result).
inline void like(const char* op, const char* name, const at::Tensor& t, c10::IntArrayRef shape,
                 at::ScalarType dtype, const c10::Device& device, const char* what = "the emissions'") {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  on_device(op, name, t, device, what);
}

}  // namespace fastner::checks
