// int8 products of fastner::rnn_layer_int8_forward (csrc/cpu/rnn.cpp runs its layer loop with
// these in place of the float GEMMs): C[m, n] = beta * C + A[m, K] @ W^T with W quantized once
// per output channel (symmetric, 7-bit: w_q in [-63, 63], scale[n] = max|W[n, :]| / 63) and
// the rows of A quantized on every call (asymmetric, 7-bit: q = clamp(round(a / s) + z, 0,
// 127) with s = (max(a, 0) - min(a, 0)) / 127). The exact arithmetic is
// fastner.reference.quantize_rows_int8 / int8_product; tests/ops/rnn/test_rnn_int8.py compares them.
//
// Why 7 bits on both sides. The AVX2 kernel multiplies u8 by s8 with vpmaddubsw, which adds
// pairs of products into int16 with saturation, then widens with vpmaddwd. On Zen 2 both
// multiplies issue on one pipe and bound the kernel. With u7 activations and s7 weights a
// vpmaddubsw lane is at most 2 * 127 * 63 = 16002, so two of them add in int16 without
// overflow before one vpmaddwd: 3 multiplies per 64 products instead of 4 (measured ~1.3x on
// the op at the tagger shape). Full u8 x s8 would saturate vpmaddubsw (2 * 255 * 127 > 2^15).
// Error of one product vs fp32 on random rows (relative Frobenius): u7 x s8 0.9-1.3%, u7 x s7
// ~1.5%, u8 x s7 1.4%; the CoNLL tagger's F1 moved by less than 0.05 (README numbers).
// Dequantization happens in the kernel's store (the int32 sums never reach memory): out =
// float(acc - z * colsum[n]) * (s * scale[n]), which is what the gate pass then reads.
//
// Non-finite values: a row holding NaN or +-inf is not quantized (its scale would be
// meaningless and its output silently finite); its product is the one float arithmetic gives
// (NaN / +-inf in every column, see multiply), so NaN and inf reach the cells exactly where
// the float32 layer with the dequantized weights has them, in the input, hx / cx, or arising
// in the recurrence. A finite row with a range past float's max is scaled without overflow.
//
// Three kernels, one arithmetic: this AVX2 one (the build's baseline, -march=x86-64-v3) and,
// where the CPU has AVX512-VNNI, rnn_int8_vnni.h's vpdpbusd kernel, and where it has AMX-INT8
// rnn_int8_amx.h's tile kernel, on the same packed weights and quantized rows, bit-identical
// (7-bit operands keep the sums exact). On an AMD EPYC Zen 4 (1 thread) the VNNI kernel took the
// int8 LSTM layer at the tagger shape from 3.44-3.54 to 2.37-2.41 ms (fastner bench --only
// precision, FASTNER_RNN_INT8=avx2 vs unset). The rows are quantized 16 lanes at a time for the
// two AVX-512 kernels (quantize_row_avx512), 8 for this one, to the same bits.
#pragma once

#include <cstdint>

namespace fastner::cpu::rnn::int8 {

constexpr int32_t kActivationMax = 127;  // activations are u7: [0, 127]
constexpr int32_t kWeightMax = 63;        // weights are s7: [-63, 63]

// One row's quantization from its range [lo, hi] (lo <= 0 <= hi, both finite): the scale s,
// 1 / s and the zero point z, as fastner.reference.quantize_rows_int8 computes them. Every
// kernel's row quantizer (rnn_int8.cpp's quantize_row, rnn_int8_vnni.cpp's
// quantize_row_avx512) takes them from this one function, so that all quantize alike. Static
// and free of standard-library templates: it is inlined into code compiled for AVX-512 too,
// and no copy of it may be merged across instruction sets by the linker (a call per row was
// ~2% of an int8 layer).
struct RowQuantization {
  float scale, inverse;
  int32_t zero;
};
static inline RowQuantization row_quantization(float lo, float hi) {
  constexpr float kMax = static_cast<float>(kActivationMax);
  float s = (hi - lo) / kMax;
  // A finite row whose range overflows float: the same range, divided first.
  if (__builtin_isinf(s)) s = hi / kMax - lo / kMax;
  // An all-zero row: any scale; a tiny range: at least FLT_MIN, so that 1 / s stays finite.
  constexpr float kSmallest = 1.17549435e-38f;  // FLT_MIN
  s = s > 0.0f ? (s < kSmallest ? kSmallest : s) : 1.0f;
  const float inv = 1.0f / s;
  const int32_t z = static_cast<int32_t>(__builtin_nearbyintf(-lo * inv));  // -lo * inv in [0, ~127]
  return {s, inv, z < 0 ? 0 : z > kActivationMax ? kActivationMax : z};
}

// A packed weight: what fastner::rnn_int8_pack returns (one int8 CPU tensor; its bytes as they
// lie in memory, x86-64 little-endian) and the int8 forward takes in place of W_ih / W_hh. The
// s7 weights W [N, K] (row-major) with their per-channel scales [N], laid out for the kernels:
//
//   offset 0                     header, 8 x int64: kPackMagic ("FNI8PK" + the format's
//                                version), N, K, groups, panels, total bytes, 0, 0
//   offset kHeaderBytes (64)     panels: int8 [panels, groups, 2, 8, 4]: panel p holds output
//                                channels [16p, 16p + 16); group g holds k in [4g, 4g + 4); the
//                                16 channels in two halves of 8, each channel's 4 bytes together
//                                (one 32-bit word, what vpdpbusd / vpmaddubsw take), zeros past
//                                N and past K
//   + panels * groups * 64       column sums: int32 [panels * 16], sum_k W[n, k] (0 past N)
//   + panels * 16 * 4            scales: float32 [panels * 16] (0 past N)
//   total packed_bytes(N, K)
//
// groups = 2 * ceil(K / 8) (the AVX2 kernel takes groups two at a time), panels = ceil(N / 16).
// Every offset is a multiple of 4 (64 for the panels) from the tensor's start.
// fastner.reference.rnn_int8_pack / rnn_int8_unpack write and read the same bytes (a test
// compares them bit for bit).
//
// Why a packed tensor: packing is a pass over all the weights (a transpose into panels, column
// sums, the range check) that the op used to run on every call, ~60 us a call at the tagger's
// shape (H = 200, both directions) and a large share of a short sentence's call; the int8
// modules (fastner/nn/quantize.py) now pack once, when they quantize their weights, and keep
// the packed tensors as buffers.
// The forward checks a packed tensor's size (which N and K fix), its header and its dtype /
// device; the payload itself is trusted as rnn_int8_pack wrote it: validating it on every call
// would be a pass over all the weights again. Whatever its contents, the kernels read only
// inside the size the checked N and K give.
constexpr int64_t kPanel = 16;  // output channels per panel
constexpr int64_t kHeaderBytes = 64;
constexpr int64_t kPackMagic = 0x3130'4B50'3849'4E46;  // "FNI8PK01" in memory: format version 01

struct PackLayout {
  PackLayout(int64_t n, int64_t k) : n(n), k(k), groups((k + 7) / 8 * 2), panels((n + kPanel - 1) / kPanel) {}
  int64_t panel_bytes() const { return panels * groups * 64; }
  int64_t colsum_offset() const { return kHeaderBytes + panel_bytes(); }
  int64_t scale_offset() const { return colsum_offset() + panels * kPanel * 4; }
  int64_t bytes() const { return scale_offset() + panels * kPanel * 4; }

  int64_t n, k, groups, panels;
};

inline int64_t packed_bytes(int64_t n, int64_t k) { return PackLayout(n, k).bytes(); }

// Whether a [n, k] weight has a packed size that int64 holds (n, k >= 0): an op argument (a
// hidden size, an empty input's width) must not wrap the size a packed tensor is checked against.
inline bool packable(int64_t n, int64_t k) {
  if (n < 0 || k < 0) return false;
  const __int128 groups = (static_cast<__int128>(k) + 7) / 8 * 2, panels = (static_cast<__int128>(n) + kPanel - 1) / kPanel;
  return kHeaderBytes + panels * groups * 64 + panels * kPanel * 8 <= INT64_MAX;
}

// Writes the packed form of w [N, K] (s8, row-major) and scale [N] to out (packed_bytes(n, k)
// bytes, any alignment). Raises ValueError naming `name` and the first row holding a weight
// outside [-63, 63] (it could overflow the AVX2 kernel's int16 sums); out is then unspecified.
void pack(const int8_t* w, const float* scale, int64_t n, int64_t k, int8_t* out, const char* name);

// A view of a packed weight in memory that outlives it (no copy): rnn.cpp's forward makes one
// per direction and matrix over the packed tensors it holds for the call.
class PackedWeights {
 public:
  // packed: bytes packed bytes of a weight [n, k] (pack's output), 4-byte aligned. Raises
  // ValueError naming `name` unless bytes == packed_bytes(n, k) and the header is the one pack
  // writes for [n, k] (a tensor packed for another shape, or something else).
  PackedWeights(const int8_t* packed, int64_t bytes, int64_t n, int64_t k, const char* name);

  // C[m, n] = beta * C + dequant(quantize_rows(A) @ W^T); A float [m, K] with leading
  // dimension lda, C [m, N] with leading dimension ldc; beta is 0 (C's old contents ignored)
  // or 1. Single-threaded (called inside a direction's task).
  // A row of A holding NaN or +-inf gets the product float arithmetic gives it, whatever its
  // finite entries (add_nonfinite_row), so that non-finite values propagate as in the float
  // layer; a finite row never yields NaN, and +-inf only where its float product overflows.
  void multiply(int64_t m, const float* a, int64_t lda, float beta, float* c, int64_t ldc) const;
  // The same with A's rows anywhere: row r at rows[r]. Each row is quantized into a buffer of
  // its own anyway, so the layer's input projection reads the input's rows where they lie,
  // in step order, without the gathered copy the float GEMMs need.
  void multiply_rows(int64_t m, const float* const* rows, float beta, float* c, int64_t ldc) const;

 private:
  template <typename RowOf>  // RowOf(r): A's row r
  void multiply_impl(int64_t m, RowOf row_of, float beta, float* c, int64_t ldc) const;
  int8_t weight(int64_t j, int64_t i) const;  // W[j, i] from the packed panels
  // c[j] += NaN where a holds a NaN, or an inf meets W[j, i] = 0, or +inf and -inf terms meet;
  // else the infinite terms' sign (fastner.reference.int8_product_nonfinite).
  void add_nonfinite_row(const float* a, float* c) const;

  PackLayout layout_;
  const int8_t* packed_ = nullptr;   // [panels, groups, 2, 8, 4]
  const int32_t* colsum_ = nullptr;  // [panels * 16]
  const float* scale_ = nullptr;     // [panels * 16]
};

}  // namespace fastner::cpu::rnn::int8
