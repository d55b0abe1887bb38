// cuBLAS stand-in for the CPU emulation (see emu.h): cublasGemmEx as cuBLAS documents it
// (column-major, op(A) [m, k], op(B) [k, n]), computed in double.
#pragma once
#include "emu.h"
#include <type_traits>
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_OTHER = 1 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77, CUBLAS_COMPUTE_64F = 70 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
namespace emu {
inline long gemms = 0;
template <typename T> double ld(const void* p, long i) { return (double)((const T*)p)[i]; }
inline double load(const void* p, cudaDataType t, long i) {
  if (t == CUDA_R_64F) return ((const double*)p)[i];
  if (t == CUDA_R_32F) return ((const float*)p)[i];
  if (t == CUDA_R_16F) return __half2float(((const __half*)p)[i]);
  return __bfloat162float(((const __nv_bfloat16*)p)[i]);
}
inline void store(void* p, cudaDataType t, long i, double v) {
  if (t == CUDA_R_64F) ((double*)p)[i] = v;
  else if (t == CUDA_R_32F) ((float*)p)[i] = (float)v;
  else if (t == CUDA_R_16F) ((__half*)p)[i] = __float2half_rn((float)v);
  else ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn((float)v);
}
}  // namespace emu
// Column-major reference: C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C.
inline cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* A, cudaDataType at, int lda, const void* B,
                                   cudaDataType bt, int ldb, const void* beta, void* C, cudaDataType ct, int ldc,
                                   cublasComputeType_t comp, cublasGemmAlgo_t) {
  ++emu::gemms;
  const double al = comp == CUBLAS_COMPUTE_64F ? *(const double*)alpha : *(const float*)alpha;
  const double be = comp == CUBLAS_COMPUTE_64F ? *(const double*)beta : *(const float*)beta;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double acc = 0;
      for (int l = 0; l < k; ++l) {
        const double a = emu::load(A, at, ta == CUBLAS_OP_N ? i + (long)l * lda : l + (long)i * lda);
        const double b = emu::load(B, bt, tb == CUBLAS_OP_N ? l + (long)j * ldb : j + (long)l * ldb);
        acc += a * b;
      }
      const long ci = i + (long)j * ldc;
      emu::store(C, ct, ci, al * acc + (be != 0 ? be * emu::load(C, ct, ci) : 0.0));
    }
  return CUBLAS_STATUS_SUCCESS;
}
