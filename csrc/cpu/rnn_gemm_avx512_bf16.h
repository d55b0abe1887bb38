// The bf16 layers' GEMM on CPUs with AVX512_BF16: C[m, n] = bf16(A)[m, k] @ B[k, n] (+ C), A
// and C float32 row-major, B bf16 (the layers' W_ih^T / W_hh^T) pre-packed once per layer
// call; one vdpbf16ps (_mm512_dpbf16_ps) multiplies 16 columns by a pair of k and adds both
// products into float32.
//
// Arithmetic (the same on every CPU: rnn_gemm.h's AVX2 fallback rounds A the same way and
// widens B; fastner/reference.py's rnn_layer defines it):
//   * every element of A is rounded to bf16 just for the product, as vcvtne2ps2bf16 does:
//     float32 denormals become a zero of their sign, NaN stays NaN (quiet), the rest round to
//     nearest even, as torch's .to(torch.bfloat16) does;
//   * B's bf16 denormals count as zeros of their sign (packing flushes them; vdpbf16ps treats
//     denormal inputs as zero whatever the packing does);
//   * the products of two bf16 values are exact in float32; they and the sums are float32.
// What the reference does not model: vdpbf16ps also flushes a denormal float32 result (of a
// product or a partial sum) to zero, and sums in its own order (odd element of a pair, then
// even). Both change a dot product by float32 reassociation plus at most ~k * 2^-126 in
// absolute terms, far below the tests' tolerances.
//
// Panel layout (pack): panel p = columns [16p, 16p + 16), kp = ceil(k / 2) rows of 16 32-bit
// words; word c of row q = bf16(B[2q][16p + c]) | bf16(B[2q + 1][16p + c]) << 16 (the pair's
// even k in the low half, as vdpbf16ps pairs them; zeros past n and, for odd k, in the last
// row's high halves). A's rows are rounded per call into a per-thread scratch of the same
// pairing (a pair of k per 32-bit word, zero-padded for odd k), from which the micro-kernel
// broadcasts one word per row and k pair.
#pragma once

#include <cstdint>

namespace fastner::cpu::rnn::avx512_bf16_gemm {

// Whether multiply() may run: this build compiled the kernel (GCC >= 10 on x86-64), the CPU has
// AVX-512 F/BW/VL and AVX512_BF16 (__builtin_cpu_supports), and fastner::cpu::isa() chose
// AVX-512 (FASTNER_CPU_ISA=avx2 forces the AVX2 path). Decided once per process.
bool available();

inline int64_t panels(int64_t n) { return (n + 15) / 16; }
inline int64_t pairs(int64_t k) { return (k + 1) / 2; }

// 32-bit words of the packed B.
inline int64_t packed_size(int64_t k, int64_t n) { return panels(n) * pairs(k) * 16; }

// Packs op(B)[k, n] (bf16 bits, B row-major with leading dimension ldb; op(B) = B^T when
// trans_b) into `out` (packed_size(k, n) words). Plain C++: runs on any CPU.
void pack(const uint16_t* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, uint32_t* out);

// pack() with `panel_rows` >= pairs(k) rows of 16 words a panel, the rows past pairs(k) zero:
// the AMX kernel's layout (rnn_gemm_amx_bf16.h), whose tiles take k in blocks of 16 pairs.
// panels(n) * panel_rows * 16 words.
void pack_rows(const uint16_t* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, int64_t panel_rows, uint32_t* out);

// A per-thread 64-byte aligned scratch of at least `words` 32-bit words, kept across calls (one
// per step: allocating it per call would cost more than the rounding); the next call on the
// thread may move it.
uint32_t* row_scratch(int64_t words);

// A[m, k] (float32, leading dimension lda) rounded to bf16 as the header says, pairs of k per
// 32-bit word: row r at out + r * row_words, words past pairs(k) (row_words >= pairs(k)) zero.
// Only where available().
void round_rows(int64_t m, int64_t k, const float* a, int64_t lda, uint32_t* out, int64_t row_words);

// C[m, n] = bf16(A)[m, k] @ packed B (+ C when accumulate); single-threaded; only where
// available(). Rounds A into a per-thread scratch first.
void multiply(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const uint32_t* packed, bool accumulate,
              float* c, int64_t ldc);

}  // namespace fastner::cpu::rnn::avx512_bf16_gemm
