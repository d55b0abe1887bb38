// The CRF kernels of csrc/cuda/kernels/crf.cuh run on the CPU through emulate_cuda.h, behind a
// C ABI that tests/ops/crf/test_crf_cuda_emulated.py calls with ctypes. Every entry point runs the real
// launcher (launch shapes, shared-memory layout, scratch sizes) and the real kernels. forward's
// alphas may be null (as crf_forward passes it); given, they are compared with the reference's.
// backward's scratch starts as garbage: launch_backward must write all it reads.
// dev_sms sets the multiprocessor count the backward's group count is derived from (small
// values make groups loop over several sequences); smem_optin the k-best opt-in limit.
#include "emulate_cuda.h"
// clang-format off
#include "cuda/kernels/crf.cuh"
// clang-format on

#include <vector>

using namespace fastner::cuda::crf::kernels;

namespace {

template <typename E>
int forward(const void* em, const int64_t* tags, const int64_t* lengths, const void* tr, const void* start,
            const void* end, void* log_z, void* gold, void* alphas, int64_t B, int64_t T, int K) {
  using A = acc_t<E>;
  return launch_forward<E>(static_cast<const E*>(em), tags, lengths, static_cast<const A*>(tr),
                           static_cast<const A*>(start), static_cast<const A*>(end), static_cast<A*>(log_z),
                           static_cast<A*>(gold), static_cast<A*>(alphas), B, T, K, nullptr);
}

template <typename E>
int backward(const void* gl, const void* gg, const void* em, const int64_t* tags, const int64_t* lengths,
             const void* tr, const void* start, const void* end, void* grad_em, void* grad_tr, void* grad_start,
             void* grad_end, int64_t B, int64_t T, int K, int dev_sms) {
  using A = acc_t<E>;
  const DeviceLimits dev{dev_sms, 0};
  const int64_t P = backward_partial_count(B, K, dev);
  std::vector<A> partials(static_cast<size_t>(P * partial_width(K)), A(-12345));  // garbage
  std::vector<A> forward_scratch(static_cast<size_t>(backward_forward_scratch(B, T, K)), A(-6789));  // garbage
  return launch_backward<E>(static_cast<const A*>(gl), static_cast<const A*>(gg), static_cast<const E*>(em), tags,
                            lengths, static_cast<const A*>(tr), static_cast<const A*>(start),
                            static_cast<const A*>(end), static_cast<E*>(grad_em), static_cast<A*>(grad_tr),
                            static_cast<A*>(grad_start), static_cast<A*>(grad_end), forward_scratch.data(),
                            partials.data(), P, B, T, K, nullptr);
}

template <typename E>
int viterbi(const void* em, const int64_t* lengths, const void* tr, const void* start, const void* end,
            int64_t* tags, void* scores, int64_t B, int64_t T, int K) {
  using A = acc_t<E>;
  std::vector<unsigned char> scratch(viterbi_scratch_bytes<A>(B, T, K), 0xff);
  return launch_viterbi<E>(static_cast<const E*>(em), lengths, static_cast<const A*>(tr),
                           static_cast<const A*>(start), static_cast<const A*>(end), tags, static_cast<A*>(scores),
                           scratch.empty() ? nullptr : scratch.data(), B, T, K, nullptr);
}

template <typename E>
int kbest(const void* em, const int64_t* lengths, const void* tr, const void* start, const void* end,
          int64_t* tags, void* scores, int64_t B, int64_t T, int K, int k, int64_t smem_optin) {
  using A = acc_t<E>;
  std::vector<int32_t> scratch(kbest_scratch_bytes(B, T, K, k) / sizeof(int32_t), -7);
  const DeviceLimits dev{1, static_cast<size_t>(smem_optin)};
  return launch_kbest<E>(static_cast<const E*>(em), lengths, static_cast<const A*>(tr), static_cast<const A*>(start),
                         static_cast<const A*>(end), tags, static_cast<A*>(scores), scratch.data(), B, T, K, k, dev,
                         nullptr);
}

template <typename E>
int marginals(const void* em, const int64_t* lengths, const void* tr, const void* start, const void* end, void* out,
              int64_t B, int64_t T, int K) {
  using A = acc_t<E>;
  return launch_marginals<E>(static_cast<const E*>(em), lengths, static_cast<const A*>(tr),
                             static_cast<const A*>(start), static_cast<const A*>(end), static_cast<A*>(out), B, T, K,
                             nullptr);
}

}  // namespace

// Suffixes: f32 = float, f64 = double, f16 = __half, bf16 = __nv_bfloat16 emissions.
#define FASTNER_EMU_ENTRY_POINTS(E, suffix)                                                                         \
  extern "C" int emu_forward_##suffix(const void* em, const int64_t* tags, const int64_t* lengths, const void* tr, \
                                      const void* start, const void* end, void* log_z, void* gold, void* alphas,   \
                                      int64_t B, int64_t T, int K) {                                               \
    return forward<E>(em, tags, lengths, tr, start, end, log_z, gold, alphas, B, T, K);                            \
  }                                                                                                                 \
  extern "C" int emu_backward_##suffix(const void* gl, const void* gg, const void* em, const int64_t* tags,        \
                                       const int64_t* lengths, const void* tr, const void* start, const void* end, \
                                       void* grad_em, void* grad_tr, void* grad_start, void* grad_end, int64_t B,  \
                                       int64_t T, int K, int dev_sms) {                                            \
    return backward<E>(gl, gg, em, tags, lengths, tr, start, end, grad_em, grad_tr, grad_start, grad_end, B, T, K, \
                       dev_sms);                                                                                   \
  }                                                                                                                 \
  extern "C" int emu_viterbi_##suffix(const void* em, const int64_t* lengths, const void* tr, const void* start,   \
                                      const void* end, int64_t* tags, void* scores, int64_t B, int64_t T, int K) { \
    return viterbi<E>(em, lengths, tr, start, end, tags, scores, B, T, K);                                         \
  }                                                                                                                 \
  extern "C" int emu_kbest_##suffix(const void* em, const int64_t* lengths, const void* tr, const void* start,     \
                                    const void* end, int64_t* tags, void* scores, int64_t B, int64_t T, int K,     \
                                    int k, int64_t smem_optin) {                                                   \
    return kbest<E>(em, lengths, tr, start, end, tags, scores, B, T, K, k, smem_optin);                            \
  }                                                                                                                 \
  extern "C" int emu_marginals_##suffix(const void* em, const int64_t* lengths, const void* tr, const void* start, \
                                        const void* end, void* out, int64_t B, int64_t T, int K) {                 \
    return marginals<E>(em, lengths, tr, start, end, out, B, T, K);                                                \
  }

FASTNER_EMU_ENTRY_POINTS(float, f32)
FASTNER_EMU_ENTRY_POINTS(double, f64)
FASTNER_EMU_ENTRY_POINTS(__half, f16)
FASTNER_EMU_ENTRY_POINTS(__nv_bfloat16, bf16)
