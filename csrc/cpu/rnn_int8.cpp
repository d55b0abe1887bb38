// The AVX2 u7 x s8 product of the int8 recurrent layers (see rnn_int8.h).
#include "cpu/rnn_int8.h"

#include "cpu/rnn_gemm_avx2.h"
#include "cpu/rnn_int8_amx.h"
#include "cpu/rnn_int8_vnni.h"

#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace fastner::cpu::rnn::int8 {
namespace {

// kPanel (rnn_int8.h): 16 output channels per panel, two 8-lane int32 accumulators here.
constexpr int64_t kRows = 4;    // rows of A per micro-kernel call
constexpr int64_t kVnniMaxRows = 6;  // products of at most this many rows skip AMX (multiply_impl)

// Per-thread scratch for the quantized rows of A, kept across calls (see rnn.cpp thread_buffer).
struct RowScratch {
  std::vector<uint8_t> q;     // [m, groups * 4]
  std::vector<float> scale;   // [m]
  std::vector<int32_t> zero;  // [m]
  std::vector<int64_t> nonfinite;  // rows holding NaN or +-inf (quantize_row returned false)
};

RowScratch& row_scratch(int64_t m, int64_t width) {
  thread_local RowScratch scratch;
  if (scratch.q.size() < static_cast<size_t>(m * width)) scratch.q.resize(m * width);
  if (scratch.scale.size() < static_cast<size_t>(m)) {
    scratch.scale.resize(m);
    scratch.zero.resize(m);
  }
  return scratch;
}

// One row of A [k] -> q [width] (u7, zeros past k), its scale and zero point; returns false
// (q all zero, scale 1, zero point 0: the row's product is exactly 0) for a row holding NaN or
// +-inf, whose product add_nonfinite_row gives instead. The float operations and their order
// are fastner.reference.quantize_rows_int8's.
bool quantize_row(const float* a, int64_t k, uint8_t* q, int64_t width, float* scale, int32_t* zero) {
  __m256 vmin = _mm256_setzero_ps(), vmax = _mm256_setzero_ps();  // min(.., 0), max(.., 0)
  __m256 vnan = _mm256_setzero_ps();  // lanes that saw a NaN (min / max drop NaNs)
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 x = _mm256_loadu_ps(a + i);
    vmin = _mm256_min_ps(vmin, x);
    vmax = _mm256_max_ps(vmax, x);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  float lo_lanes[8], hi_lanes[8];
  _mm256_storeu_ps(lo_lanes, vmin);
  _mm256_storeu_ps(hi_lanes, vmax);
  float lo = 0.0f, hi = 0.0f;
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (int l = 0; l < 8; ++l) lo = std::min(lo, lo_lanes[l]), hi = std::max(hi, hi_lanes[l]);
  for (; i < k; ++i) lo = std::min(lo, a[i]), hi = std::max(hi, a[i]), nan |= std::isnan(a[i]);
  if (nan || !std::isfinite(lo) || !std::isfinite(hi)) {
    *scale = 1.0f;
    *zero = 0;
    std::fill(q, q + width, uint8_t(0));
    return false;
  }
  const RowQuantization row = row_quantization(lo, hi);
  const float inv = row.inverse;
  const int32_t z = row.zero;
  *scale = row.scale;
  *zero = z;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i vz = _mm256_set1_epi32(z), vlo = _mm256_setzero_si256(), vhi = _mm256_set1_epi32(kActivationMax);
  i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(a + i), vinv));  // round to nearest even
    v = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(v, vz), vlo), vhi);
    const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(w16, w16));
  }
  // |a * inv| <= ~127 here (finite row, s >= its range / 127): the int conversion is exact.
  for (; i < k; ++i)
    q[i] = static_cast<uint8_t>(std::clamp(static_cast<int32_t>(std::nearbyint(a[i] * inv)) + z, 0, kActivationMax));
  std::fill(q + k, q + width, uint8_t(0));
  return true;
}

// acc[r][h] (8 int32 lanes: output channels 8h..8h+7 of the panel) = sum over the row's groups
// of u7 x s8 products.
// groups is even (the packing pads it): two groups (8 k) per iteration, their vpmaddubsw
// results added in int16 before the one vpmaddwd: |u7 * s7 + u7 * s7| <= 2 * 127 * 63 = 16002
// per vpmaddubsw lane, so the int16 sum of two stays below 2^15 and nothing saturates. Three
// multiplies per 64 products instead of four: on Zen 2 both multiplies issue on one pipe and
// bound the kernel.
template <int MR>
inline void micro_kernel(const uint8_t* a, int64_t lda, const int8_t* panel, int64_t groups, __m256i (&acc)[kRows][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; g += 2) {
    const int8_t* w = panel + g * 64;
    const __m256i w00 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
    const __m256i w10 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64));
    const __m256i w11 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 96));
    for (int r = 0; r < MR; ++r) {
      int32_t four0, four1;
      std::memcpy(&four0, a + r * lda + 4 * g, 4);
      std::memcpy(&four1, a + r * lda + 4 * g + 4, 4);
      const __m256i a0 = _mm256_set1_epi32(four0), a1 = _mm256_set1_epi32(four1);
      const __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, w00), _mm256_maddubs_epi16(a1, w10));
      const __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, w01), _mm256_maddubs_epi16(a1, w11));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(s0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(s1, ones));
    }
  }
}

// Dequantizes acc for MR rows into C's columns [n0, n0 + cols): out = float(acc - z * colsum) *
// (s * scale), added to C with one FMA when beta is 1 (the VNNI kernel's store does exactly
// these operations: rnn_int8_vnni.cpp, so both give the same bits).
template <int MR>
inline void store(__m256i (&acc)[kRows][2], const float* row_scale, const int32_t* row_zero, const int32_t* colsum,
                  const float* wscale, float beta, float* c, int64_t ldc, int64_t cols) {
  for (int r = 0; r < MR; ++r) {
    const __m256i z = _mm256_set1_epi32(row_zero[r]);
    const __m256 s = _mm256_set1_ps(row_scale[r]);
    float* dst = c + r * ldc;
    for (int h = 0; h < 2; ++h) {
      const int64_t n = std::min<int64_t>(8, cols - 8 * h);
      if (n <= 0) break;
      const __m256i adj = _mm256_sub_epi32(acc[r][h], _mm256_mullo_epi32(z, _mm256_loadu_si256(
                                                                                reinterpret_cast<const __m256i*>(colsum + 8 * h))));
      // s * scale first: a huge row's s times the integer sum could overflow where the result does not.
      const __m256 factor = _mm256_mul_ps(s, _mm256_loadu_ps(wscale + 8 * h));
      const __m256 sum = _mm256_cvtepi32_ps(adj);
      alignas(32) float lanes[8] = {};  // a partial panel's columns, in and out
      float* out = n == 8 ? dst + 8 * h : lanes;
      if (n < 8 && beta != 0.0f) std::copy_n(dst + 8 * h, n, lanes);
      const __m256 v = beta != 0.0f ? _mm256_fmadd_ps(sum, factor, _mm256_loadu_ps(out)) : _mm256_mul_ps(sum, factor);
      _mm256_storeu_ps(out, v);
      if (n < 8) std::copy_n(lanes, n, dst + 8 * h);
    }
  }
}

template <int MR>
void row_block(const RowScratch& rows, int64_t r0, int64_t width, const int8_t* packed, const int32_t* colsum,
               const float* wscale, int64_t groups, int64_t panels, int64_t n, float beta, float* c, int64_t ldc) {
  __m256i acc[kRows][2];
  for (int64_t p = 0; p < panels; ++p) {
    micro_kernel<MR>(rows.q.data() + r0 * width, width, packed + p * groups * 64, groups, acc);
    store<MR>(acc, rows.scale.data() + r0, rows.zero.data() + r0, colsum + p * kPanel, wscale + p * kPanel, beta,
              c + r0 * ldc + p * kPanel, ldc, std::min(kPanel, n - p * kPanel));
  }
}

}  // namespace

void pack(const int8_t* w, const float* scale, int64_t n, int64_t k, int8_t* out, const char* name) {
  const PackLayout layout(n, k);
  const int64_t groups = layout.groups, panels = layout.panels;
  const int64_t header[8] = {kPackMagic, n, k, groups, panels, layout.bytes(), 0, 0};
  std::memcpy(out, header, sizeof(header));
  int8_t* packed = out + kHeaderBytes;
  std::memset(packed, 0, layout.bytes() - kHeaderBytes);  // padding: zeros past N and past K
  // Channels 8 at a time (half a panel): each channel's K weights go 4 at a time (one 32-bit
  // word, a group) to the groups' slots. 8 channels x 8 groups are one 8 x 8 transpose of words
  // (avx2_gemm::transpose8x8); the rest word by word. (This ran on every op call until the
  // packed weights became an op argument: word by word it was ~90 us of a one-token LSTM call.)
  int64_t full = 0;  // channels [0, full) packed by the 8-channel blocks' words
  for (int64_t j0 = 0; j0 + 8 <= n; j0 += 8, full = j0) {
    int8_t* dst = packed + (j0 / kPanel) * groups * 64 + (j0 % kPanel) / 8 * 32;
    const int8_t* src = w + j0 * k;
    int64_t g = 0;
    for (; 4 * (g + 8) <= k; g += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * k + 4 * g)));
      avx2_gemm::transpose8x8(r);
      for (int jj = 0; jj < 8; ++jj) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (g + jj) * 64), _mm256_castps_si256(r[jj]));
    }
    for (int64_t lane = 0; lane < 8; ++lane)
      for (int64_t i = 4 * g; i < k; ++i) dst[(i / 4) * 64 + lane * 4 + i % 4] = src[lane * k + i];
  }
  for (int64_t j = full; j < n; ++j) {
    const int8_t* src = w + j * k;
    int8_t* dst = packed + (j / kPanel) * groups * 64 + (j % kPanel) / 8 * 32 + (j % 8) * 4;
    for (int64_t i = 0; i < k; ++i) dst[(i / 4) * 64 + i % 4] = src[i];
  }
  // Column sums and the range check from the packed panels, 8 channels a register (the bytes
  // past K and past N are zeros: they add nothing and are in range).
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
  int8_t* colsum = out + layout.colsum_offset();
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t h = 0; h < 2; ++h) {
      __m256i sum = _mm256_setzero_si256();
      const int8_t* panel = packed + p * groups * 64 + h * 32;
      for (int64_t g = 0; g < groups; ++g) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + g * 64));
        // 1 x byte pairs into int16, then pairs of those into int32: each channel's 4 bytes.
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
        lo = _mm256_min_epi8(lo, v);
        hi = _mm256_max_epi8(hi, v);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(colsum + (p * kPanel + h * 8) * 4), sum);
    }
  }
  alignas(32) int8_t lo_bytes[32], hi_bytes[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lo_bytes), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(hi_bytes), hi);
  const int lowest = *std::min_element(lo_bytes, lo_bytes + 32), highest = *std::max_element(hi_bytes, hi_bytes + 32);
  if (lowest < -kWeightMax || highest > kWeightMax) {
    for (int64_t j = 0; j < n; ++j) {  // the first bad row, for the message
      const int8_t* src = w + j * k;
      const auto [row_lo, row_hi] = std::minmax_element(src, src + k);
      TORCH_CHECK_VALUE(*row_lo >= -kWeightMax && *row_hi <= kWeightMax, "rnn_int8_pack: ", name, " must be in [-",
                        kWeightMax, ", ", kWeightMax, "] (fastner.reference.quantize_weight_int8), got ",
                        static_cast<int>(*row_lo < -kWeightMax ? *row_lo : *row_hi), " in row ", j);
    }
  }
  if (n > 0) std::memcpy(out + layout.scale_offset(), scale, n * sizeof(float));  // (scale may be null at n = 0)
}

PackedWeights::PackedWeights(const int8_t* packed, int64_t bytes, int64_t n, int64_t k, const char* name)
    : layout_(packable(n, k) ? n : 0, packable(n, k) ? k : 0) {
  TORCH_CHECK_VALUE(packable(n, k), "rnn_layer_int8: ", name, " cannot be the packed weight of a [", n, ", ", k,
                    "] weight: its size would not fit in int64");
  TORCH_CHECK_VALUE(bytes == layout_.bytes(), "rnn_layer_int8: ", name, " must be a weight [", n, ", ", k,
                    "] packed by fastner::rnn_int8_pack (", layout_.bytes(), " bytes), got ", bytes, " bytes");
  int64_t header[8];
  std::memcpy(header, packed, sizeof(header));
  TORCH_CHECK_VALUE(header[0] == kPackMagic, "rnn_layer_int8: ", name,
                    " is not a packed weight (no rnn_int8_pack header: pack it with fastner.ops.rnn_int8_pack)");
  TORCH_CHECK_VALUE(header[1] == n && header[2] == k, "rnn_layer_int8: ", name, " was packed for a weight [", header[1],
                    ", ", header[2], "], this layer needs [", n, ", ", k, "]");
  TORCH_CHECK_VALUE(header[3] == layout_.groups && header[4] == layout_.panels && header[5] == layout_.bytes() &&
                        header[6] == 0 && header[7] == 0,
                    "rnn_layer_int8: ", name, "'s header does not match the layout rnn_int8_pack writes for [", n,
                    ", ", k, "]");
  packed_ = packed + kHeaderBytes;
  colsum_ = reinterpret_cast<const int32_t*>(packed + layout_.colsum_offset());
  scale_ = reinterpret_cast<const float*>(packed + layout_.scale_offset());
}

void PackedWeights::multiply(int64_t m, const float* a, int64_t lda, float beta, float* c, int64_t ldc) const {
  multiply_impl(m, [a, lda](int64_t r) { return a + r * lda; }, beta, c, ldc);
}

void PackedWeights::multiply_rows(int64_t m, const float* const* rows, float beta, float* c, int64_t ldc) const {
  multiply_impl(m, [rows](int64_t r) { return rows[r]; }, beta, c, ldc);
}

template <typename RowOf>
void PackedWeights::multiply_impl(int64_t m, RowOf row_of, float beta, float* c, int64_t ldc) const {
  const int64_t n = layout_.n, k = layout_.k, groups = layout_.groups, panels = layout_.panels;
  if (m <= 0 || n == 0) return;
  // The AMX kernel reads whole tiles: rows of 64 k (zeros past K), 16 rows (zero rows past m).
  // A product of a few rows (a short batch's recurrent step) pays a whole 16-row tile's
  // tdpbusd, and the VNNI kernel (the same bits) is faster there. The int8 LSTM layer (T = 15,
  // H = 200, Emerald Rapids, 1 thread), all products on AMX -> those of <= kVnniMaxRows rows on
  // VNNI: B = 1 113-120 -> 82-100 us, B = 4 230 -> 163-165, B = 6 252 -> 231-235, B = 8 and
  // B = 12 the same within noise at a limit of 8 or 4.
  const bool amx = amx_selected() && m > kVnniMaxRows;
  const int64_t width = amx ? amx_width(groups) : groups * 4, padded_m = amx ? (m + 15) / 16 * 16 : m;
  RowScratch& rows = row_scratch(padded_m, width);
  std::vector<int64_t>& nonfinite = rows.nonfinite;
  nonfinite.clear();
  const bool wide = vnni_selected();  // the AVX-512 kernels' rows: 16 lanes at a time
  for (int64_t r = 0; r < m; ++r) {
    uint8_t* q = rows.q.data() + r * width;
    float* s = rows.scale.data() + r;
    int32_t* z = rows.zero.data() + r;
    const float* a = row_of(r);
    if (!(wide ? quantize_row_avx512(a, k, q, width, s, z) : quantize_row(a, k, q, width, s, z)))
      nonfinite.push_back(r);
  }
  if (amx) {
    // (Leaving the padding rows as an earlier call left them would be correct, their sums
    // are never stored, but measured 11% slower at B=16: zero rows it is.)
    std::fill(rows.q.data() + m * width, rows.q.data() + padded_m * width, uint8_t(0));
    multiply_amx(m, rows.q.data(), width, rows.scale.data(), rows.zero.data(), packed_, colsum_, scale_, groups, panels,
                 n, beta, c, ldc);
    for (int64_t r : nonfinite) add_nonfinite_row(row_of(r), c + r * ldc);
    return;
  }
  if (vnni_selected()) {
    multiply_vnni(m, rows.q.data(), width, rows.scale.data(), rows.zero.data(), packed_, colsum_, scale_, groups, panels,
                  n, beta, c, ldc);
    for (int64_t r : nonfinite) add_nonfinite_row(row_of(r), c + r * ldc);
    return;
  }
  int64_t r0 = 0;
  for (; r0 + kRows <= m; r0 += kRows)
    row_block<kRows>(rows, r0, width, packed_, colsum_, scale_, groups, panels, n, beta, c, ldc);
  switch (m - r0) {
    case 3: row_block<3>(rows, r0, width, packed_, colsum_, scale_, groups, panels, n, beta, c, ldc); break;
    case 2: row_block<2>(rows, r0, width, packed_, colsum_, scale_, groups, panels, n, beta, c, ldc); break;
    case 1: row_block<1>(rows, r0, width, packed_, colsum_, scale_, groups, panels, n, beta, c, ldc); break;
    default: break;
  }
  for (int64_t r : nonfinite) add_nonfinite_row(row_of(r), c + r * ldc);
}

int8_t PackedWeights::weight(int64_t j, int64_t i) const {
  return packed_[(j / kPanel) * layout_.groups * 64 + (i / 4) * 64 + (j % kPanel) / 8 * 32 + (j % 8) * 4 + i % 4];
}

void PackedWeights::add_nonfinite_row(const float* a, float* c) const {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN(), kInf = std::numeric_limits<float>::infinity();
  const int64_t n = layout_.n, k = layout_.k;
  const bool nan = std::any_of(a, a + k, [](float x) { return std::isnan(x); });
  for (int64_t j = 0; j < n; ++j) {
    float v = kNaN;
    if (!nan) {
      bool pos = false, neg = false, zero_weight = false;  // terms +inf, -inf, inf * 0 = NaN
      for (int64_t i = 0; i < k; ++i) {
        if (!std::isinf(a[i])) continue;
        const int8_t w = weight(j, i);
        if (w == 0) {
          zero_weight = true;
        } else {
          ((a[i] > 0.0f) == (w > 0) ? pos : neg) = true;
        }
      }
      if (!zero_weight && pos != neg) v = pos ? kInf : -kInf;
    }
    c[j] += v;
  }
}

}  // namespace fastner::cpu::rnn::int8
