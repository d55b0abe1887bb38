// The character CNN's convolution + max-pool over each word (Ma & Hovy's char features), CPU.
// Schemas and conventions: csrc/fastner.cpp (char_conv_max, char_conv_max_backward); reference:
// fastner.reference.char_conv_max; wrapper and autograd: fastner/ops/char_cnn.py.
//
// Why a kernel: torch runs this as conv1d (oneDNN) + masked_fill + amax, and the CharCNN
// module's forward + backward took ~2.5 ms of a 10-sentence training batch (138 words, 30
// channels, Zen 2, 1 thread; ~1 ms with this op): the GEMMs are tiny, the layout conversions,
// the convolution at padding positions and the mask passes are not. Here the forward evaluates
// the convolution only at a word's valid characters and keeps the argmax; the backward touches
// only the argmax position of each (word, filter): N*F*W*I multiply-adds, not N*C*F*W*I.
//
// Layouts: input [N, C, I] (N words of C characters with I embedding dims, any strides: read
// from a contiguous copy held for the call), valid bool [N, C], weight [F, I, W] (torch's
// Conv1d), bias [F]. output [N, F], argmax int64 [N, F]: the first position of the maximum
// over the valid characters of conv1d(input^T, weight, bias, padding=W/2) (NaN counts as the
// maximum, as in torch.max); a word without valid characters gets output 0 and argmax -1.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/StringUtil.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"

namespace fastner::cpu::char_cnn {
namespace {

using at::Tensor;

// weight [F, I, W] (a Conv1d's: F > 0 filters, an odd window W) over I input dims, in `dtype`
// on `device` (those of the float tensor named by `owner`).
void check_weight(const char* op, const Tensor& weight, int64_t I, at::ScalarType dtype, const c10::Device& device,
                  const char* owner) {
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(1) == I, op, ": weight must be [F, I, W] with I = ", I,
                    ", got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0 && weight.size(2) > 0 && weight.size(2) % 2 == 1, op,
                    ": weight must have F > 0 filters and an odd window W, got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == dtype, op, ": weight must be ", dtype, " (", owner, " dtype), got ",
                    weight.scalar_type());
  checks::on_device(op, "weight", weight, device, owner);
}

// bias [F] in `dtype` on `device`.
void check_bias(const char* op, const Tensor& bias, int64_t F, at::ScalarType dtype, const c10::Device& device,
                const char* owner) {
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == F, op, ": bias must be [F] = [", F, "], got ", bias.sizes());
  TORCH_CHECK_VALUE(bias.scalar_type() == dtype, op, ": bias must be ", dtype, " (", owner, " dtype), got ",
                    bias.scalar_type());
  checks::on_device(op, "bias", bias, device, owner);
}

// input and weight as char_conv_max and its backward take them.
void check_model(const char* op, const Tensor& input, const Tensor& weight) {
  TORCH_CHECK_VALUE(input.dim() == 3, op, ": input must be [N, C, I], got ", input.dim(), " dimensions");
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                    ": input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.device().is_cpu(), op, ": input must be on the CPU, got ", input.device());
  TORCH_CHECK_VALUE(input.size(2) > 0, op, ": input must have I > 0 embedding dims, got ", input.sizes());
  check_weight(op, weight, input.size(2), input.scalar_type(), input.device(), "the input's");
}

// Vectors of 32 bytes (8 floats or 4 doubles): the build's baseline is x86-64-v3 (AVX2 + FMA).
template <typename scalar_t>
struct Vec {
  typedef scalar_t type __attribute__((vector_size(32)));
  // Integers of the scalar's width: comparison results, and positions kept beside the values.
  using index = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;
  typedef index mask __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(scalar_t);
};

// weight [F, I, W] as [W, I, chunks] of vectors: taps[(k * I + i) * chunks + j] holds filters
// j * lanes .. j * lanes + lanes - 1 of tap k, input dim i (zeros past F).
template <typename scalar_t>
std::vector<typename Vec<scalar_t>::type> taps_by_filter(const Tensor& weight, int64_t chunks) {
  using V = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  const Tensor w = weight.contiguous();
  const int64_t F = w.size(0), I = w.size(1), W = w.size(2);
  const scalar_t* src = w.const_data_ptr<scalar_t>();
  std::vector<V> out(W * I * chunks, V{});
  for (int64_t f = 0; f < F; ++f)
    for (int64_t i = 0; i < I; ++i)
      for (int64_t k = 0; k < W; ++k) out[(k * I + i) * chunks + f / L][f % L] = src[(f * I + i) * W + k];
  return out;
}

// The convolution of one word at P positions cs[0..P) for filter chunks [first, first + CB):
// P * CB vector accumulators stay in registers across the W * I multiply-adds. One position
// alone (P = 1) is latency-bound: each multiply-add waits for the previous one of its
// accumulator, so its CB chains run W * I multiply-adds in a row at ~4 cycles each (Zen 4
// measured: 480 us for the 820 words of a 48-token batch, one thread); P positions share each
// tap load and keep the FMA pipes busy. Each position's sum runs in the same order whatever P
// (bias, then taps k = 0.., dims i = 0..).
// A tap that falls outside the word (zero padding) reads `zeros` (I zeros) when given, which
// adds 0 * weight to the sums: nothing (at most a -0 becomes +0) while every weight is finite,
// which the caller checks. Without `zeros` such a tap is skipped, as an infinite weight times
// the padding's zero would be NaN; then a position whose window leaves the word goes alone.
template <typename scalar_t, int CB, int P>
void conv_at(const scalar_t* word, const scalar_t* zeros, int64_t C, int64_t I, int64_t W,
             const int64_t* cs, int64_t chunks, int64_t first, const typename Vec<scalar_t>::type* taps,
             const typename Vec<scalar_t>::type* bias, typename Vec<scalar_t>::type* out) {
  using V = typename Vec<scalar_t>::type;
  V acc[P][CB];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < CB; ++j) acc[p][j] = bias[first + j];
  const int64_t half = W / 2;
  for (int64_t k = 0; k < W; ++k) {
    const scalar_t* rows[P];
    bool skip = false;
    for (int p = 0; p < P; ++p) {
      const int64_t pos = cs[p] + k - half;
      const bool inside = pos >= 0 && pos < C;
      rows[p] = inside ? word + pos * I : zeros;
      skip = skip || (!inside && zeros == nullptr);
    }
    if (skip) continue;
    const V* tap = taps + k * I * chunks + first;
    for (int64_t i = 0; i < I; ++i) {
      for (int j = 0; j < CB; ++j) {
        const V t = tap[i * chunks + j];
        for (int p = 0; p < P; ++p) acc[p][j] += rows[p][i] * t;
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < CB; ++j) out[p * chunks + first + j] = acc[p][j];
}

// conv_at over every filter chunk: blocks of 4 vectors (32 floats), then the rest. out: [P, chunks].
template <typename scalar_t, int P>
void conv_all_chunks(const scalar_t* word, const scalar_t* zeros, int64_t C, int64_t I, int64_t W,
                     const int64_t* cs, int64_t chunks, const typename Vec<scalar_t>::type* taps,
                     const typename Vec<scalar_t>::type* bias, typename Vec<scalar_t>::type* out) {
  int64_t first = 0;
  for (; first + 4 <= chunks; first += 4) conv_at<scalar_t, 4, P>(word, zeros, C, I, W, cs, chunks, first, taps, bias, out);
  switch (chunks - first) {
    case 3: conv_at<scalar_t, 3, P>(word, zeros, C, I, W, cs, chunks, first, taps, bias, out); break;
    case 2: conv_at<scalar_t, 2, P>(word, zeros, C, I, W, cs, chunks, first, taps, bias, out); break;
    case 1: conv_at<scalar_t, 1, P>(word, zeros, C, I, W, cs, chunks, first, taps, bias, out); break;
    default: break;
  }
}

// Positions evaluated together, at most: 3 gives 12 accumulators for the tagger's 30 filters
// (4 chunks), which with a tap and the broadcasts fill AVX2's 16 vector registers. Measured
// at the tagger's shapes (Zen 4, 1 thread, 820 words): 1 (before) 480 us, 2 410, 3 345, 4 436
// (spills).
constexpr int kGroup = 3;

std::tuple<Tensor, Tensor> char_conv_max_cpu(const Tensor& input_in, const Tensor& valid_in,
                                             const Tensor& weight, const Tensor& bias) {
  const char* op = "char_conv_max";
  check_model(op, input_in, weight);
  const int64_t N = input_in.size(0), C = input_in.size(1), I = input_in.size(2);
  const int64_t F = weight.size(0), W = weight.size(2), half = W / 2;
  TORCH_CHECK_VALUE(valid_in.dim() == 2 && valid_in.size(0) == N && valid_in.size(1) == C, op,
                    ": valid must be [N, C] = [", N, ", ", C, "], got ", valid_in.sizes());
  TORCH_CHECK_VALUE(valid_in.scalar_type() == at::kBool, op, ": valid must be bool, got ", valid_in.scalar_type());
  checks::on_device(op, "valid", valid_in, input_in.device(), "the input's");
  check_bias(op, bias, F, input_in.scalar_type(), input_in.device(), "the input's");
  // Held for the whole call: the kernels read through their data pointers.
  const Tensor input = input_in.contiguous(), valid = valid_in.contiguous(), b = bias.contiguous();
  Tensor output = at::empty({N, F}, input.options());
  Tensor argmax = at::empty({N, F}, input.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "char_conv_max", [&] {
    using V = typename Vec<scalar_t>::type;
    constexpr int64_t L = Vec<scalar_t>::lanes;
    const int64_t chunks = (F + L - 1) / L;
    const std::vector<V> taps = taps_by_filter<scalar_t>(weight, chunks);
    std::vector<V> bias_vec(chunks, V{});
    const scalar_t* bias_data = b.const_data_ptr<scalar_t>();
    for (int64_t f = 0; f < F; ++f) bias_vec[f / L][f % L] = bias_data[f];
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const bool* ok = valid.const_data_ptr<bool>();
    // The padding's zeros for conv_at, unless a weight is infinite or NaN (see conv_at).
    const bool finite = std::all_of(taps.begin(), taps.end(), [](const V& tap) {
      for (int64_t l = 0; l < L; ++l)
        if (!std::isfinite(tap[l])) return false;
      return true;
    });
    const std::vector<scalar_t> zero_row(I, scalar_t(0));
    const scalar_t* zeros = finite ? zero_row.data() : nullptr;
    scalar_t* out = output.data_ptr<scalar_t>();
    int64_t* arg = argmax.data_ptr<int64_t>();
    // ~C*F*W*I multiply-adds a word: chunks of ~400k multiply-adds (12 words of the tagger's).
    const int64_t grain = std::max<int64_t>(1, 400000 / std::max<int64_t>(1, C * F * W * I));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      using M = typename Vec<scalar_t>::mask;
      std::vector<V> acc_vectors(kGroup * chunks), best(chunks);
      std::vector<M> where(chunks);  // per filter: the position of its maximum so far, -1: none
      std::vector<int64_t> positions(C);
      const auto groupable = [&](int64_t c) { return zeros != nullptr || (c >= half && c + half < C); };
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* word = x + n * C * I;
        int64_t* word_arg = arg + n * F;
        for (int64_t j = 0; j < chunks; ++j) where[j] = M{} - 1;
        int64_t count = 0;  // the word's valid positions, in order
        for (int64_t c = 0; c < C; ++c)
          if (ok[n * C + c]) positions[count++] = c;
        for (int64_t q = 0; q < count;) {
          // Up to kGroup positions (4 left: 2 + 2, not 3 + 1, a lone position being the
          // slowest); without zeros, a position whose window leaves the word goes alone.
          int64_t m = 1;
          const int64_t most = count - q == 4 ? 2 : kGroup;
          if (groupable(positions[q]))
            while (m < most && q + m < count && groupable(positions[q + m])) ++m;
          const int64_t* cs = positions.data() + q;
          V* acc = acc_vectors.data();
          switch (m) {
            case 1: conv_all_chunks<scalar_t, 1>(word, zeros, C, I, W, cs, chunks, taps.data(), bias_vec.data(), acc); break;
            case 2: conv_all_chunks<scalar_t, 2>(word, zeros, C, I, W, cs, chunks, taps.data(), bias_vec.data(), acc); break;
            case 3: conv_all_chunks<scalar_t, 3>(word, zeros, C, I, W, cs, chunks, taps.data(), bias_vec.data(), acc); break;
            default: break;
          }
          // In position order: the first maximum; the first NaN wins over any number (torch.max's rule).
          for (int64_t p = 0; p < m; ++p) {
            const M here = M{} + static_cast<typename Vec<scalar_t>::index>(cs[p]);
            for (int64_t j = 0; j < chunks; ++j) {
              const V v = acc[p * chunks + j], b = best[j];
              const M take = (where[j] < 0) | (v > b) | ((v != v) & (b == b));
              best[j] = take ? v : b;
              where[j] = take ? here : where[j];
            }
          }
          q += m;
        }
        for (int64_t f = 0; f < F; ++f) {
          const int64_t position = where[f / L][f % L];
          word_arg[f] = position;
          out[n * F + f] = position < 0 ? scalar_t(0) : best[f / L][f % L];
        }
      }
    });
  });
  return {output, argmax};
}

std::tuple<Tensor, Tensor, Tensor> char_conv_max_backward_cpu(const Tensor& grad_output_in,
                                                              const Tensor& input_in,
                                                              const Tensor& argmax_in,
                                                              const Tensor& weight) {
  const char* op = "char_conv_max_backward";
  check_model(op, input_in, weight);
  const int64_t N = input_in.size(0), C = input_in.size(1), I = input_in.size(2);
  const int64_t F = weight.size(0), W = weight.size(2), half = W / 2;
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad_output", &grad_output_in},
                                std::pair<const char*, const Tensor*>{"argmax", &argmax_in}}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == N && t->size(1) == F, op, ": ", name,
                      " must be [N, F] = [", N, ", ", F, "], got ", t->sizes());
    checks::on_device(op, name, *t, input_in.device(), "the input's");
  }
  TORCH_CHECK_VALUE(grad_output_in.scalar_type() == input_in.scalar_type(), op, ": grad_output must be ",
                    input_in.scalar_type(), " (the input's dtype), got ", grad_output_in.scalar_type());
  TORCH_CHECK_VALUE(argmax_in.scalar_type() == at::kLong, op, ": argmax must be int64, got ",
                    argmax_in.scalar_type());
  const Tensor input = input_in.contiguous(), grad_output = grad_output_in.contiguous();
  const Tensor argmax = argmax_in.contiguous();
  const int64_t* arg = argmax.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < N * F; ++e) {  // every position is an index below: all checked first
    TORCH_CHECK_VALUE(arg[e] >= -1 && arg[e] < C, op, ": argmax[", e / F, ", ", e % F, "] = ", arg[e],
                      " is outside [-1, C = ", C, ")");
  }
  Tensor grad_input = at::zeros({N, C, I}, input.options());
  Tensor grad_weight = at::empty({F, I, W}, input.options());
  Tensor grad_bias = at::zeros({F}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "char_conv_max_backward", [&] {
    using V = typename Vec<scalar_t>::type;
    constexpr int64_t L = Vec<scalar_t>::lanes;
    // Rows of I > 0 values as whole vectors (zero padded): the input rows of a word, their
    // gradients, the taps weight[f, :, k] and grad_weight's rows, so no loop has a scalar tail.
    const int64_t chunks = (I + L - 1) / L;
    const Tensor w_dense = weight.contiguous();
    const scalar_t* w = w_dense.const_data_ptr<scalar_t>();
    std::vector<V> taps(F * W * chunks, V{}), gw(F * W * chunks, V{});  // [F, W, chunks]
    for (int64_t f = 0; f < F; ++f)
      for (int64_t i = 0; i < I; ++i)
        for (int64_t k = 0; k < W; ++k) taps[(f * W + k) * chunks + i / L][i % L] = w[(f * I + i) * W + k];
    std::vector<V> rows(C * chunks), grad_rows(C * chunks);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_input.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    // One pass in word order: the sums into grad_weight and grad_bias come out in the same order
    // at any thread count.
    for (int64_t n = 0; n < N; ++n) {
      const int64_t* word_arg = arg + n * F;
      bool any = false;
      for (int64_t f = 0; f < F && !any; ++f) any = word_arg[f] >= 0;
      if (!any) continue;  // a word without valid characters: no gradient
      // (vector types may alias their elements: rows are copied as scalar arrays)
      for (int64_t c = 0; c < C; ++c) {
        rows[c * chunks + chunks - 1] = V{};
        std::memcpy(&rows[c * chunks], x + (n * C + c) * I, I * sizeof(scalar_t));
        for (int64_t j = 0; j < chunks; ++j) grad_rows[c * chunks + j] = V{};
      }
      for (int64_t f = 0; f < F; ++f) {
        const int64_t c = word_arg[f];
        if (c < 0) continue;
        const scalar_t grad = g[n * F + f];
        gb[f] += grad;
        for (int64_t k = 0; k < W; ++k) {
          const int64_t pos = c + k - half;
          if (pos < 0 || pos >= C) continue;
          const V* row = rows.data() + pos * chunks;
          V* grad_row = grad_rows.data() + pos * chunks;
          const V* tap = taps.data() + (f * W + k) * chunks;
          V* gw_row = gw.data() + (f * W + k) * chunks;
          for (int64_t j = 0; j < chunks; ++j) {
            gw_row[j] += grad * row[j];
            grad_row[j] += grad * tap[j];
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) std::memcpy(gx + (n * C + c) * I, &grad_rows[c * chunks], I * sizeof(scalar_t));
    }
    scalar_t* gw_out = grad_weight.data_ptr<scalar_t>();
    for (int64_t f = 0; f < F; ++f)
      for (int64_t i = 0; i < I; ++i)
        for (int64_t k = 0; k < W; ++k) gw_out[(f * I + i) * W + k] = gw[(f * W + k) * chunks + i / L][i % L];
  });
  return {grad_input, grad_weight, grad_bias};
}

// ---- char_embed_conv_max: the inference forward through a table --------------------------
// The convolution is linear in the embedded characters, and a character's embedding is one of
// V rows: tap k of the window over character v contributes table[k][v] = weight[:, :, k] @
// embedding[v] whatever the word. So the op builds the [W, V, F] table once a call (V*W*F*I
// multiply-adds) and a position's F values are bias + W table rows added; char_conv_max spends
// W*F*I multiply-adds there (2,700 at the tagger's shape, where it ran at ~1.2x the FMA floor:
// 345 us for the 820 words of a 48-token batch, Zen 4, 1 thread). The same sums, reassociated:
// the floats differ from char_conv_max's in rounding only. No argmax (nothing to backpropagate),
// no dropout on the embeddings (inference): the CharCNN module takes it in eval mode without
// gradients when V is at most its batch's character positions (the table then costs at most
// what the convolution would).
//
// Layouts: chars int64 [..., C] (words of C characters, N in all: [B, T, C] for a batch, so that
// a traced graph holds no reshape), words bool [...] (only the words marked are read; the others
// get zeros), embedding [V, I], weight [F, I, W], bias [F]. output [..., F]:
// for a marked word, the maximum over its valid characters (chars != pad_id) of bias + the taps
// k whose position c + k - W/2 lies inside [0, C) (the convolution's zero padding: a tap outside
// is skipped, as char_conv_max does when a weight is not finite), NaN counting as the maximum;
// 0 for a word without valid characters. Every character of a marked word must be in [0, V)
// (its neighbours read their rows, padding characters included).

// table[(k * V + v) * chunks + j] = filters j * L .. j * L + L - 1 of weight[:, :, k] @ embedding[v]
// (zeros past F), summed over i = 0.. in that order; CB chunks [first, first + CB) of one
// (k, v) here, their sums in registers (in memory they waited on store forwarding: ~3x slower).
template <typename scalar_t, int CB>
void embedded_tap(const scalar_t* row, int64_t I, const typename Vec<scalar_t>::type* tap, int64_t chunks,
                  int64_t first, typename Vec<scalar_t>::type* out) {
  typename Vec<scalar_t>::type acc[CB] = {};
  for (int64_t i = 0; i < I; ++i)
    for (int j = 0; j < CB; ++j) acc[j] += row[i] * tap[i * chunks + first + j];
  for (int j = 0; j < CB; ++j) out[first + j] = acc[j];
}

template <typename scalar_t>
std::vector<typename Vec<scalar_t>::type> embedded_taps(const scalar_t* embedding, int64_t V, int64_t I, int64_t W,
                                                        const std::vector<typename Vec<scalar_t>::type>& taps,
                                                        int64_t chunks) {
  std::vector<typename Vec<scalar_t>::type> table(W * V * chunks);
  // ~W*chunks*I vector multiply-adds a row: chunks of rows the size of ~100 of the tagger's.
  const int64_t grain = std::max<int64_t>(1, 40000 / std::max<int64_t>(1, W * chunks * I));
  at::parallel_for(0, V, grain, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      for (int64_t k = 0; k < W; ++k) {
        const auto* tap = taps.data() + k * I * chunks;
        auto* out = table.data() + (k * V + v) * chunks;
        int64_t first = 0;
        for (; first + 4 <= chunks; first += 4) embedded_tap<scalar_t, 4>(embedding + v * I, I, tap, chunks, first, out);
        switch (chunks - first) {
          case 3: embedded_tap<scalar_t, 3>(embedding + v * I, I, tap, chunks, first, out); break;
          case 2: embedded_tap<scalar_t, 2>(embedding + v * I, I, tap, chunks, first, out); break;
          case 1: embedded_tap<scalar_t, 1>(embedding + v * I, I, tap, chunks, first, out); break;
          default: break;
        }
      }
    }
  });
  return table;
}

// One word's maximum for CB chunks [first, first + CB) of filters: over its valid positions in
// order, bias + the taps inside the word (k = 0.., char_conv_max's order), the first maximum
// kept and the first NaN winning over any number (torch.max's rule). Returns whether the word
// has a valid position (else `best` is untouched).
template <typename scalar_t, int CB>
bool embedded_word_max(const int64_t* word, int64_t C, int64_t pad_id, int64_t V, int64_t W,
                       const typename Vec<scalar_t>::type* table, int64_t chunks, int64_t first,
                       const typename Vec<scalar_t>::type* bias, typename Vec<scalar_t>::type* best) {
  using Vt = typename Vec<scalar_t>::type;
  using M = typename Vec<scalar_t>::mask;
  const int64_t half = W / 2;
  Vt kept[CB] = {};  // (overwritten at the first valid position)
  bool any = false;
  for (int64_t c = 0; c < C; ++c) {
    if (word[c] == pad_id) continue;
    Vt acc[CB];
    for (int j = 0; j < CB; ++j) acc[j] = bias[first + j];
    for (int64_t k = 0; k < W; ++k) {
      const int64_t pos = c + k - half;
      if (pos < 0 || pos >= C) continue;
      const Vt* row = table + (k * V + word[pos]) * chunks + first;
      for (int j = 0; j < CB; ++j) acc[j] += row[j];
    }
    for (int j = 0; j < CB; ++j) {
      const M take = (M{} - (any ? 0 : 1)) | (acc[j] > kept[j]) | ((acc[j] != acc[j]) & (kept[j] == kept[j]));
      kept[j] = take ? acc[j] : kept[j];
    }
    any = true;
  }
  if (any)
    for (int j = 0; j < CB; ++j) best[first + j] = kept[j];
  return any;
}

Tensor char_embed_conv_max_cpu(const Tensor& chars_in, const Tensor& words_in, const Tensor& embedding_in,
                               const Tensor& weight, const Tensor& bias, int64_t pad_id) {
  const char* op = "char_embed_conv_max";
  TORCH_CHECK_VALUE(chars_in.dim() >= 2 && chars_in.scalar_type() == at::kLong, op,
                    ": chars must be int64 [..., C] (words x characters), got ", chars_in.scalar_type(), " ",
                    chars_in.sizes());
  TORCH_CHECK_VALUE(chars_in.device().is_cpu(), op, ": chars must be on the CPU, got ", chars_in.device());
  const at::IntArrayRef words_shape = chars_in.sizes().slice(0, chars_in.dim() - 1);
  const int64_t N = c10::multiply_integers(words_shape), C = chars_in.size(-1);
  TORCH_CHECK_VALUE(words_in.sizes() == words_shape && words_in.scalar_type() == at::kBool, op,
                    ": words must be bool ", words_shape, " (the chars' words), got ", words_in.scalar_type(), " ",
                    words_in.sizes());
  checks::on_device(op, "words", words_in, chars_in.device(), "the chars'");
  TORCH_CHECK_VALUE(embedding_in.dim() == 2 && embedding_in.size(1) > 0, op,
                    ": embedding must be [V, I] with I > 0, got ", embedding_in.sizes());
  TORCH_CHECK_VALUE(embedding_in.scalar_type() == at::kFloat || embedding_in.scalar_type() == at::kDouble, op,
                    ": embedding must be float32 or float64, got ", embedding_in.scalar_type());
  checks::on_device(op, "embedding", embedding_in, chars_in.device(), "the chars'");
  const int64_t V = embedding_in.size(0), I = embedding_in.size(1);
  check_weight(op, weight, I, embedding_in.scalar_type(), chars_in.device(), "the embedding's");
  const int64_t F = weight.size(0), W = weight.size(2);
  check_bias(op, bias, F, embedding_in.scalar_type(), chars_in.device(), "the embedding's");
  // Held for the whole call: the kernels read through their data pointers.
  const Tensor chars = chars_in.contiguous(), words = words_in.contiguous(), embedding = embedding_in.contiguous();
  const Tensor b = bias.contiguous();
  const int64_t* ids = chars.const_data_ptr<int64_t>();
  const bool* read = words.const_data_ptr<bool>();
  for (int64_t n = 0; n < N; ++n) {  // every row index below: all checked first
    if (!read[n]) continue;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t id = ids[n * C + c];
      if (id >= 0 && id < V) continue;
      std::vector<int64_t> where(words_shape.size() + 1, c);  // n's index in words_shape, then c
      for (int64_t d = static_cast<int64_t>(words_shape.size()) - 1, rest = n; d >= 0; rest /= words_shape[d], --d)
        where[d] = rest % words_shape[d];
      TORCH_CHECK_VALUE(false, op, ": chars[", c10::Join(", ", where), "] = ", id, " is outside [0, V = ", V,
                        ") (the embedding's rows)");
    }
  }
  std::vector<int64_t> output_shape(words_shape.begin(), words_shape.end());
  output_shape.push_back(F);
  Tensor output = at::empty(output_shape, embedding.options());  // [..., F]
  AT_DISPATCH_FLOATING_TYPES(embedding.scalar_type(), "char_embed_conv_max", [&] {
    using Vt = typename Vec<scalar_t>::type;
    constexpr int64_t L = Vec<scalar_t>::lanes;
    const int64_t chunks = (F + L - 1) / L;
    const std::vector<Vt> table =
        embedded_taps<scalar_t>(embedding.const_data_ptr<scalar_t>(), V, I, W, taps_by_filter<scalar_t>(weight, chunks),
                                chunks);
    std::vector<Vt> bias_vec(chunks, Vt{});
    const scalar_t* bias_data = b.const_data_ptr<scalar_t>();
    for (int64_t f = 0; f < F; ++f) bias_vec[f / L][f % L] = bias_data[f];
    scalar_t* out = output.data_ptr<scalar_t>();
    // ~C*W*chunks vector adds a word: chunks of ~100 of the tagger's words.
    const int64_t grain = std::max<int64_t>(1, 24000 / std::max<int64_t>(1, C * W * chunks));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<Vt> best(chunks);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t* word = ids + n * C;
        bool any = false;
        if (read[n]) {
          int64_t first = 0;
          for (; first + 4 <= chunks; first += 4)
            any = embedded_word_max<scalar_t, 4>(word, C, pad_id, V, W, table.data(), chunks, first, bias_vec.data(), best.data());
          switch (chunks - first) {
            case 3: any = embedded_word_max<scalar_t, 3>(word, C, pad_id, V, W, table.data(), chunks, first, bias_vec.data(), best.data()); break;
            case 2: any = embedded_word_max<scalar_t, 2>(word, C, pad_id, V, W, table.data(), chunks, first, bias_vec.data(), best.data()); break;
            case 1: any = embedded_word_max<scalar_t, 1>(word, C, pad_id, V, W, table.data(), chunks, first, bias_vec.data(), best.data()); break;
            default: break;
          }
        }
        if (any) {
          std::memcpy(out + n * F, best.data(), F * sizeof(scalar_t));
        } else {
          std::fill(out + n * F, out + (n + 1) * F, scalar_t(0));
        }
      }
    });
  });
  return output;
}

}  // namespace
}  // namespace fastner::cpu::char_cnn

TORCH_LIBRARY_IMPL(fastner, CPU, m) {
  m.impl("char_conv_max", &fastner::cpu::char_cnn::char_conv_max_cpu);
  m.impl("char_conv_max_backward", &fastner::cpu::char_cnn::char_conv_max_backward_cpu);
  m.impl("char_embed_conv_max", &fastner::cpu::char_cnn::char_embed_conv_max_cpu);
}
