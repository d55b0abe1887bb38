// Row-major GEMM on raw pointers for the recurrent kernels.
//
// The per-step recurrent GEMMs are small ([<=B, H] x [H, G*H]) and there are 2*T of them per
// layer, so a call must cost no more than BLAS itself: no tensor allocation, no dispatcher.
// We call the BLAS Fortran symbol that libtorch_cpu exports (MKL in the official wheels) and
// fall back to at::mm on tensor views where a torch build exports none.
//
// Threading: called inside an at::parallel_for task (one per direction) MKL sees an active
// OpenMP region and runs single-threaded, which is what we want with one chain per core;
// called outside, it threads over the machine's cores.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastner::rnn {

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

}  // namespace fastner::rnn
