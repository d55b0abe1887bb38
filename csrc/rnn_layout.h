// What the CPU and CUDA recurrent-layer kernels, and Python's fake kernel, share about one
// layer's arguments and training workspace: the cell a mode string names, and the width of a
// workspace row on each device (rnn_layer_forward's `workspace` output, [D, B*T, width]).
// Torch-free and host/device, so csrc/cuda/kernels/rnn.cuh includes it too; Python reads the
// widths through fastner._C.rnn_workspace_width (fastner/ops/rnn.py), so each is written once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#ifdef __CUDACC__
#define FASTNER_HOST_DEVICE __host__ __device__
#else
#define FASTNER_HOST_DEVICE
#endif

namespace fastner::rnn_layout {

// Cells by index, in the order of both kernel families' Cell enums.
constexpr int kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3;

// The cell index of a mode ('lstm', 'gru', 'rnn_tanh', 'rnn_relu'), -1 for anything else.
inline int cell_of(const char* mode, size_t size) {
  const char* names[] = {"lstm", "gru", "rnn_tanh", "rnn_relu"};
  for (int cell = 0; cell < 4; ++cell) {
    if (std::strlen(names[cell]) == size && std::strncmp(names[cell], mode, size) == 0) return cell;
  }
  return -1;
}

// CPU workspace row (csrc/cpu/rnn.cpp): the gate columns in units of H (gate values after
// their nonlinearity: lstm [i f g o | c], gru [r z n | W_hn h + b_hn], rnn [h]), then the
// step's input x [I] and the previous h [H], side by side so that the weight gradients are one
// GEMM over all rows.
FASTNER_HOST_DEVICE constexpr int cpu_gate_columns(int cell) {
  return cell == kLstm ? 5 : cell == kGru ? 4 : 1;
}
FASTNER_HOST_DEVICE constexpr int64_t cpu_workspace_width(int cell, int64_t H, int64_t I) {
  return cpu_gate_columns(cell) * H + I + H;
}

// CUDA workspace row (csrc/cuda/kernels/rnn.cuh), in units of H: the gate columns, then h.
FASTNER_HOST_DEVICE constexpr int cuda_workspace_columns(int cell) {
  return cell == kLstm ? 6 : cell == kGru ? 5 : 1;
}

// The schedule both devices run a layer by (host code): the batch reordered by decreasing
// length (stable, so equal lengths keep their order), so that at every step the running
// sequences are a prefix of the slots; rows are packed step by step.
struct Schedule {
  int64_t steps = 0, rows = 0;      // steps = longest length, rows = sum of lengths
  std::vector<int64_t> order;       // [B] original batch index of slot j
  std::vector<int64_t> len;         // [B] length of slot j (non-increasing)
  std::vector<int64_t> batch_size;  // [steps] slots running at step s: a prefix
  std::vector<int64_t> offset;      // [steps + 1] first packed row of step s
};

// lengths: [B] host values, each already checked to be in [0, T].
inline Schedule schedule_by_length(const int64_t* lengths, int64_t B) {
  Schedule schedule;
  schedule.order.resize(B);
  std::iota(schedule.order.begin(), schedule.order.end(), 0);
  std::stable_sort(schedule.order.begin(), schedule.order.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  schedule.len.resize(B);
  for (int64_t j = 0; j < B; ++j) schedule.len[j] = lengths[schedule.order[j]];
  schedule.steps = B > 0 ? schedule.len[0] : 0;
  schedule.batch_size.assign(schedule.steps, 0);
  schedule.offset.assign(schedule.steps + 1, 0);
  int64_t running = B;
  for (int64_t s = 0; s < schedule.steps; ++s) {
    while (running > 0 && schedule.len[running - 1] <= s) --running;
    schedule.batch_size[s] = running;
    schedule.offset[s + 1] = schedule.offset[s] + running;
  }
  schedule.rows = schedule.offset[schedule.steps];
  return schedule;
}

}  // namespace fastner::rnn_layout
