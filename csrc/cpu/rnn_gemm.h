// Row-major GEMM on raw pointers for the recurrent kernels.
//
// The per-step recurrent GEMMs are small ([<=B, H] x [H, G*H]) and there are 2*T of them per
// layer, so a call must cost no more than BLAS itself: no tensor allocation, no dispatcher.
// We call the BLAS Fortran symbol that libtorch_cpu exports (MKL in the official wheels) and
// fall back to at::mm on tensor views where a torch build exports none.
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

// The right operand of many products C[m, n] = A[m, k] @ op(B)[k, n] with varying m (the
// running prefix of the batch): packed once into MKL's internal layout where MKL provides it,
// which saves re-packing B (0.6 MB for H = 200) on every step. Measured here, single thread,
// [32, 200] x [200, 800]: 71 us per product packed vs 96 us with torch.mm / sgemm.
template <typename T>
class PackedRight {
 public:
  PackedRight(const T* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, int64_t max_m)
      : b_(b), ldb_(ldb), trans_b_(trans_b), k_(k), n_(n) {
    if constexpr (std::is_same_v<T, float>) {
      if (cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr &&
          max_m > 0 && n > 0 && k > 0) {
        const size_t bytes = cblas_sgemm_pack_get_size(162, static_cast<int>(max_m), static_cast<int>(n), static_cast<int>(k));
        // MKL asks for ~9 MB at H = 200 (it touches far less): a fresh allocation per call costs
        // page faults on every layer call, so each thread keeps buffers for reuse: two, for the
        // forward's W_ih and W_hh.
        thread_local Buffer cache[2];
        Buffer* free_buffer = !cache[0].in_use ? &cache[0] : !cache[1].in_use ? &cache[1] : nullptr;
        if (free_buffer != nullptr) {
          free_buffer->reserve(bytes);
          free_buffer->in_use = true;
          packed_ = static_cast<float*>(free_buffer->data.get());
          release_ = &free_buffer->in_use;
        } else {
          own_.reserve(bytes);
          packed_ = static_cast<float*>(own_.data.get());
        }
        cblas_sgemm_pack(101, 162, trans_b ? 112 : 111, static_cast<int>(max_m), static_cast<int>(n), static_cast<int>(k), 1.0f,
                         b, static_cast<int>(ldb), packed_);
      }
    }
  }

  ~PackedRight() {
    if (release_ != nullptr) *release_ = false;
  }
  PackedRight(const PackedRight&) = delete;
  PackedRight& operator=(const PackedRight&) = delete;

  // C[m, n] = A[m, k] @ op(B) + beta * C (row-major, leading dimensions lda, ldc).
  void multiply(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    if (m == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      if (packed_ != nullptr) {
        cblas_sgemm_compute(101, 111, 151, static_cast<int>(m), static_cast<int>(n_), static_cast<int>(k_), a,
                            static_cast<int>(lda), packed_, static_cast<int>(ldb_), beta, c,
                            static_cast<int>(ldc));
        return;
      }
    }
    gemm<T>(false, trans_b_, m, n_, k_, T(1), a, lda, b_, ldb_, beta, c, ldc);
  }

 private:
  const T* b_;
  int64_t ldb_;
  bool trans_b_;
  int64_t k_, n_;
  // A 64-byte aligned byte buffer that only grows.
  struct Buffer {
    std::unique_ptr<void, decltype(&std::free)> data{nullptr, &std::free};
    size_t size = 0;
    bool in_use = false;
    void reserve(size_t bytes) {
      if (bytes <= size) return;
      const size_t rounded = (bytes + 63) / 64 * 64;
      data.reset(std::aligned_alloc(64, rounded));
      TORCH_CHECK(data != nullptr, "rnn_layer: out of memory packing W_hh (", rounded, " bytes)");
      size = rounded;
    }
  };
  float* packed_ = nullptr;  // MKL's packed B (float32 only); nullptr: plain gemm
  Buffer own_;               // used when the thread's cached buffer is taken
  bool* release_ = nullptr;  // the thread's cache flag to clear when done with its buffer
};

}  // namespace fastner::cpu::rnn
