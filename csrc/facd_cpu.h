// Shared declarations of the fused FACD CPU kernels (csrc/facd_kernels.h) and
// their host code (csrc/facd_cpu.cpp). Plain C++ only: the per-ISA translation
// units include this and the ATen vector headers, nothing else from torch.
#pragma once

#include <cstdint>

namespace facd {

// Floor of the per-position channel norm in normalize="channel" (reference.EPS_NORM).
constexpr double kEpsNorm = 1e-6;

// Target number of elements (channels x positions) of one tile row: a 4x2
// block of rows then streams through L1 (6 rows x 4 KiB in float32).
constexpr int64_t kTileElements = 1024;

// Fewest positions in a tile (unless H*W is smaller), whatever C, so that the
// per-channel loops of the gather and the normalisation are long enough to vectorise.
constexpr int64_t kMinTilePositions = 16;

// A thread gathers the tiles of about this many consecutive positions at once
// (a block): it then reads each channel of a source in runs of 256 bytes or
// more (float32), with software prefetch, instead of C runs of 64 bytes from C
// different pages per tile, which made a per-tile gather from NCHW tensors
// memory-latency bound. 128 positions were no faster (EDSR and RCAN taps) and
// doubled the per-thread staging memory (2B rows x C x block positions).
constexpr int64_t kBlockPositions = 64;

// Tile rows are zero-padded to a multiple of this many elements, the widest
// vector (AVX-512, 16 floats): padded elements are 0 in every row, so they add
// psi(0) = 0 to every sum and psi'(0) = 0 to every gradient, and no loop needs
// a scalar tail.
constexpr int64_t kRowAlignment = 16;

enum class Distance { L1, L2 };
enum class ScalarKind { Float16, BFloat16, Float32, Float64 };

// A strided (rows, C, H, W) feature stack: row r lives at
// data + (r / rows_inner) * stride_outer + (r % rows_inner) * stride_inner.
// student/teacher: rows = B (rows_inner = 1); negatives: rows = B*K (rows_inner = K).
struct FeatureRows {
  void* data = nullptr;  // nullptr: absent (no negatives, or a gradient not needed)
  ScalarKind kind = ScalarKind::Float32;
  int64_t rows_inner = 1;
  int64_t stride_outer = 0, stride_inner = 0;
  int64_t stride_c = 0, stride_h = 0, stride_w = 0;

  int64_t row_offset(int64_t row) const {
    return (row / rows_inner) * stride_outer + (row % rows_inner) * stride_inner;
  }
};

// One distance computation. The position space (H*W) is cut into tiles of
// `positions_per_tile` consecutive positions, and the tiles into blocks of
// `tiles_per_block`; a tile's work depends only on its index, so any split of
// the blocks across threads gives the same bits.
//
// Pairs come in groups: in-batch negatives are one group (every student row
// against every teacher row, B x B pairs); explicit negatives are B groups
// (student i against teacher i, then negatives[i, 0..K-1]: 1 x (1+K) pairs).
struct DistanceProblem {
  FeatureRows student, teacher, negatives;
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t negatives_per_patch = 0;  // K; 0 means in-batch negatives
  Distance distance = Distance::L1;
  bool normalize = true;
  bool compute_in_double = false;  // float64 inputs; else float32 accumulation
  int64_t positions_per_tile = 1, tiles = 1, row_length = kRowAlignment;
  int64_t tiles_per_block = 1, blocks = 1;

  bool in_batch() const { return negatives_per_patch == 0; }
  int64_t groups() const { return in_batch() ? 1 : batch; }
  int64_t group_students() const { return in_batch() ? batch : 1; }
  int64_t group_targets() const { return in_batch() ? batch : 1 + negatives_per_patch; }
  int64_t pairs() const { return groups() * group_students() * group_targets(); }
};

// Where the gradients go; an absent (data == nullptr) output is not computed.
struct GradientOutputs {
  FeatureRows student, teacher, negatives;
};

// What the l1 in-batch forward keeps for the student's gradient: per element
// of s_hat_i, sign(s_hat_i - t_hat_i) (plane 0) and the sum over k != i of
// sign(s_hat_i - t_hat_k) (plane 1), both exact integers, as int8 (B <= 128)
// or int16. Layout (2, B, C*H*W), each row ordered tile by tile: tile t of
// row i starts at i * C*H*W + t * C * positions_per_tile and holds a
// (C, positions of the tile) row-major block (only the last tile is partial).
struct SignState {
  void* data = nullptr;  // nullptr: not kept
  bool wide = false;     // int16 instead of int8
  int64_t plane = 0;     // elements per plane: B * C * H * W
};

// The kernels of one instruction set. Each processes blocks [block_begin, block_end).
struct KernelTable {
  const char* name;
  // partial: (tiles, pairs) float64; writes the rows of the blocks' tiles:
  // partial[tile][pair] = sum over the tile's elements of psi(x - y), pairs in
  // group-major, student-major order.
  void (*distance_sums)(const DistanceProblem&, int64_t block_begin, int64_t block_end, double* partial);
  // weights: (pairs,) float64, dL/dsum of each pair (already divided by C*H*W,
  // and doubled for l2 so that psi' is the plain difference). Writes the
  // gradient of every element of the blocks' positions in each present output.
  void (*distance_gradients)(const DistanceProblem&, const double* weights, const GradientOutputs&,
                             int64_t block_begin, int64_t block_end);
  // In-batch negatives only. partial: (tiles, B, 2) float64; writes, for the
  // blocks' tiles, partial[tile][i] = {sum psi(s_hat_i - t_hat_i), sum over
  // k != i of sum psi(s_hat_i - t_hat_k)} over the tile's elements. l1 sweeps
  // the B x B pairs once and, if state.data, writes the SignState of the
  // blocks' positions; l2 uses the closed form
  // sum_{k != i} (a - t_k)^2 = B (a - m)^2 + sum_k (t_k - m)^2 - (a - t_i)^2,
  // m = mean_k t_k, per element: O(B C H W), no pairs.
  void (*in_batch_sums)(const DistanceProblem&, int64_t block_begin, int64_t block_end, double* partial,
                        const SignState& state);
  // In-batch negatives only. grad_pos, grad_neg: (B,) float64 upstream
  // gradients of d_pos, d_neg. l1: the student's gradient from the SignState
  // (one elementwise pass and the normalisation's chain rule); outputs.teacher
  // must be absent. l2: student's and teacher's gradients in closed form.
  // A row whose upstream gradients are both 0 gets exactly 0, whatever its
  // features hold (its features are not read).
  void (*in_batch_gradients)(const DistanceProblem&, const double* grad_pos, const double* grad_neg,
                             const SignState& state, const GradientOutputs&, int64_t block_begin, int64_t block_end);
};

// nullptr where the instruction set is not compiled in (non-x86, non-GCC-compatible compiler).
const KernelTable* default_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();

}  // namespace facd
