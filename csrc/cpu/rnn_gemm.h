// Row-major GEMM on raw pointers for the recurrent kernels.
//
// The per-step recurrent GEMMs are small ([<=B, H] x [H, G*H]) and there are 2*T of them per
// layer, so a call must cost no more than BLAS itself: no tensor allocation, no dispatcher.
// We call the BLAS Fortran symbol that libtorch_cpu exports (MKL in the official wheels) and
// fall back to at::mm on tensor views where a torch build exports none.
//
// The products by a weight that many steps reuse go through PackedRight (below), which picks
// MKL's packed sgemm or fastner's AVX2 kernel per machine (bf16 weights: fastner's
// AVX512_BF16 kernel, rnn_gemm_avx512_bf16.h, or the AVX2 one); the rest (the backward's weight
// and input gradients) call gemm().
//
// Why MKL and not oneDNN: measured here (single thread, process time, loaded machine), per
// product: [32, 200] x [200, 800] torch.mm (MKL) 79 us vs oneDNN mkldnn_linear 153 us;
// [470, 130] x [130, 800] 612 vs 1312 us. The oneDNN path pays reorders and allocation on every
// call; its rate advantage only shows on large square GEMMs.
//
// Threading: called inside an at::parallel_for task (one per direction) MKL sees an active
// OpenMP region and runs single-threaded, which is what we want with one chain per core;
// called outside, it threads over the machine's cores.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/rnn_gemm_avx2.h"
#include "cpu/rnn_gemm_amx_bf16.h"
#include "cpu/rnn_gemm_avx512_bf16.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's packed GEMM (row-major enums: RowMajor 101, NoTrans 111, Trans 112, Packed 151,
// BMatrix 162): the B operand is packed once per layer call and reused by every step.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
                      float* dest) __attribute__((weak));
// Per-thread BLAS thread count (0 = back to the global setting); returns the previous one.
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace fastner::cpu::rnn {

// C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C, all row-major with leading
// dimensions lda, ldb, ldc; op(X) = X^T when trans_x. beta = 0 ignores C's old contents.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
      return;
    }
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  auto out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  auto prod = at::mm(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
  if (beta == T(0)) {
    out.copy_(prod.mul_(alpha));
  } else {
    out.mul_(beta).add_(prod, alpha);
  }
}

// While alive, BLAS calls from this thread run single-threaded (MKL would already do so inside
// an OpenMP region with nesting off; this makes it independent of the OpenMP settings).
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// Which kernel multiplies a float32 A by a packed right operand: MKL's packed sgemm or
// fastner's AVX2 kernel (rnn_gemm_avx2.h); plain gemm where neither exists (float64, or a
// build without them). bf16 weights: AmxBf16 (rnn_gemm_amx_bf16.h), Avx512Bf16
// (rnn_gemm_avx512_bf16.h) or Avx2.
enum class RightKernel { Gemm, MklPacked, Avx2, Avx512Bf16, AmxBf16 };

// The kernel for products [m <= max_m, k] x [k, n] at this thread's BLAS thread count: timed
// at first use of the shape (both kernels, interleaved, best of 5; ~1-10 ms once per process
// and shape) and remembered. FASTNER_RNN_GEMM=mkl or =avx2 forces one (tests, comparisons).
// Why measured rather than a rule: the rates depend on the CPU's vendor and cache sizes, e.g.
// on an AMD EPYC (Zen 2, 1 thread) at [32, 200] x [200, 800] MKL packed ran at ~59 GFLOP/s
// and the AVX2 kernel at ~78; on Intel MKL has its fast paths.
RightKernel choose_float_kernel(int64_t k, int64_t n, int64_t max_m);

// The kernel behind the bf16 weights' products on this machine: AmxBf16 where
// amx_bf16_gemm::available(), else Avx512Bf16 where avx512_bf16_gemm::available(), else Avx2
// (which rounds A to bf16 the same way, so that all give one arithmetic); Gemm where none is
// compiled. A rule, not a measurement: a tdpbf16ps does 8,192 multiply-adds in ~16 cycles, a
// vdpbf16ps 32, the AVX2 kernel's two FMAs 16.
RightKernel bf16_kernel();

// "amx_bf16", "avx512_bf16" or "avx2": the bf16 kernel's name in fastner.backend() and below.
const char* bf16_kernel_name(RightKernel kernel);

// Records that products by bf16 weights of shape [k, n] ran on `kernel` (reported below).
void note_bf16_kernel(int64_t k, int64_t n, RightKernel kernel);

// One line per measured float32 shape, "k=.. n=.. m<=.. blas_threads=..: mkl_packed X, avx2 Y
// GFLOP/s -> avx2", and one per bf16 weight shape run so far, "bf16 k=.. n=..: avx512_bf16" (or
// ": avx2"): fastner._C.rnn_gemm_choices() (the tests check which bf16 kernel ran).
std::vector<std::string> float_kernel_choices();

// The right operand of many products C[m, n] = A[m, k] @ op(B)[k, n] with varying m (the
// running prefix of the batch), packed once per layer call: into MKL's internal layout or
// into the AVX2 kernel's panels (saves re-packing B, 0.6 MB for H = 200, on every step).
// B: a contiguous 2-D weight tensor of type T, or bfloat16 when T is float (the bf16 layers:
// bf16_kernel(), both kernels rounding A's rows to bf16 on every product).
template <typename T>
class PackedRight {
 public:
  PackedRight(const at::Tensor& weight, bool trans_b, int64_t k, int64_t n, int64_t max_m)
      : ldb_(weight.size(1)), trans_b_(trans_b), k_(k), n_(n) {
    if (weight.scalar_type() != at::kBFloat16) b_ = weight.const_data_ptr<T>();
    if (max_m <= 0 || n <= 0 || k <= 0) return;
    if (weight.scalar_type() == at::kBFloat16) {
      kernel_ = std::is_same_v<T, float> ? bf16_kernel() : RightKernel::Gemm;
      TORCH_CHECK(kernel_ != RightKernel::Gemm,
                  "rnn_layer: bfloat16 weights need float32 input and an x86-64 AVX2 build of fastner");
      note_bf16_kernel(k, n, kernel_);
      bf16_ = true;
      const auto* bits = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<at::BFloat16>());
      if (kernel_ == RightKernel::AmxBf16) {
        auto* dest = static_cast<uint32_t*>(buffer(amx_bf16_gemm::packed_size(k, n) * sizeof(uint32_t)));
        amx_bf16_gemm::pack(bits, ldb_, trans_b, k, n, dest);
        packed_ = dest;
      } else if (kernel_ == RightKernel::Avx512Bf16) {
        auto* dest = static_cast<uint32_t*>(buffer(avx512_bf16_gemm::packed_size(k, n) * sizeof(uint32_t)));
        avx512_bf16_gemm::pack(bits, ldb_, trans_b, k, n, dest);
        packed_ = dest;
      } else {
        auto* dest = static_cast<uint16_t*>(buffer(avx2_gemm::packed_size(k, n) * sizeof(uint16_t)));
        avx2_gemm::pack<uint16_t>(bits, ldb_, trans_b, k, n, dest);
        packed_ = dest;
      }
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      kernel_ = choose_float_kernel(k, n, max_m);
      if (kernel_ == RightKernel::MklPacked) {
        const size_t bytes = cblas_sgemm_pack_get_size(162, static_cast<int>(max_m), static_cast<int>(n), static_cast<int>(k));
        auto* dest = static_cast<float*>(buffer(bytes));
        cblas_sgemm_pack(101, 162, trans_b ? 112 : 111, static_cast<int>(max_m), static_cast<int>(n), static_cast<int>(k),
                         1.0f, b_, static_cast<int>(ldb_), dest);
        packed_ = dest;
      } else if (kernel_ == RightKernel::Avx2) {
        auto* dest = static_cast<float*>(buffer(avx2_gemm::packed_size(k, n) * sizeof(float)));
        avx2_gemm::pack<float>(b_, ldb_, trans_b, k, n, dest);
        packed_ = dest;
      }
    }
  }

  ~PackedRight() {
    if (release_ != nullptr) *release_ = false;
  }
  PackedRight(const PackedRight&) = delete;
  PackedRight& operator=(const PackedRight&) = delete;

  // C[m, n] = A[m, k] @ op(B) + beta * C (row-major, leading dimensions lda, ldc); beta 0 or 1.
  void multiply(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    if (m == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      if (kernel_ == RightKernel::AmxBf16 && packed_ != nullptr) {
        amx_bf16_gemm::multiply(m, n_, k_, a, lda, static_cast<const uint32_t*>(packed_), beta != 0.0f, c, ldc);
        return;
      }
      if (kernel_ == RightKernel::Avx512Bf16 && packed_ != nullptr) {
        avx512_bf16_gemm::multiply(m, n_, k_, a, lda, static_cast<const uint32_t*>(packed_), beta != 0.0f, c, ldc);
        return;
      }
#ifdef FASTNER_RNN_GEMM_AVX2
      if (kernel_ == RightKernel::Avx2 && packed_ != nullptr) {
        if (bf16_) {
          // A's rows rounded to bf16 (as the AVX512_BF16 kernel rounds them) into a per-thread
          // scratch, then the widening kernel: the same arithmetic on every CPU.
          thread_local std::vector<float> rounded;
          if (rounded.size() < static_cast<size_t>(m * k_)) rounded.resize(m * k_);
          avx2_gemm::round_rows_to_bf16(m, k_, a, lda, rounded.data());
          avx2_gemm::multiply<uint16_t>(m, n_, k_, rounded.data(), k_, static_cast<const uint16_t*>(packed_),
                                        beta != 0.0f, c, ldc);
        } else {
          avx2_gemm::multiply<float>(m, n_, k_, a, lda, static_cast<const float*>(packed_), beta != 0.0f, c, ldc);
        }
        return;
      }
#endif
      if (kernel_ == RightKernel::MklPacked && packed_ != nullptr) {
        cblas_sgemm_compute(101, 111, 151, static_cast<int>(m), static_cast<int>(n_), static_cast<int>(k_), a,
                            static_cast<int>(lda), static_cast<const float*>(packed_), static_cast<int>(ldb_), beta, c,
                            static_cast<int>(ldc));
        return;
      }
    }
    // (bf16 weights reach here only for an empty product, k = 0 or n = 0, which reads no B.)
    gemm<T>(false, trans_b_, m, n_, k_, T(1), a, lda, b_, ldb_, beta, c, ldc);
  }

 private:
  // A 64-byte aligned byte buffer that only grows.
  struct Buffer {
    std::unique_ptr<void, decltype(&std::free)> data{nullptr, &std::free};
    size_t size = 0;
    bool in_use = false;
    void reserve(size_t bytes) {
      if (bytes <= size) return;
      const size_t rounded = (bytes + 63) / 64 * 64;
      data.reset(std::aligned_alloc(64, rounded));
      TORCH_CHECK(data != nullptr, "rnn_layer: out of memory packing a weight (", rounded, " bytes)");
      size = rounded;
    }
  };

  // `bytes` of packing space. MKL asks for ~9 MB at H = 200 (it touches far less): a fresh
  // allocation per call costs page faults on every layer call, so each thread keeps buffers
  // for reuse: two, for the forward's W_ih and W_hh.
  void* buffer(size_t bytes) {
    thread_local Buffer cache[2];
    Buffer* free_buffer = !cache[0].in_use ? &cache[0] : !cache[1].in_use ? &cache[1] : nullptr;
    if (free_buffer == nullptr) {
      own_.reserve(bytes);
      return own_.data.get();
    }
    free_buffer->reserve(bytes);
    free_buffer->in_use = true;
    release_ = &free_buffer->in_use;
    return free_buffer->data.get();
  }

  const T* b_ = nullptr;  // the unpacked B (type T); nullptr for bf16 weights
  int64_t ldb_;
  bool trans_b_;
  int64_t k_, n_;
  RightKernel kernel_ = RightKernel::Gemm;
  bool bf16_ = false;             // packed_ holds bf16 panels (the AVX2, AVX512_BF16 or AMX layout)
  const void* packed_ = nullptr;  // MKL's packed B or fastner's panels; nullptr: plain gemm
  Buffer own_;                    // used when the thread's cached buffers are taken
  bool* release_ = nullptr;       // the thread's cache flag to clear when done with its buffer
};

}  // namespace fastner::cpu::rnn
