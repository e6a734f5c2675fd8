// The fused FACD distance kernels, written once against at::vec::Vectorized<T>
// and compiled once per instruction set: the including translation unit
// defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and the matching
// CPU_CAPABILITY_* macro before including this file, as ATen's own kernels do,
// and gets facd::<CPU_CAPABILITY>::kernel_table().
//
// Algorithm. The positions (H*W) are cut into tiles, the tiles into blocks
// (DistanceProblem); threads take whole blocks. Per block and group of rows:
//   1. every row of the group is gathered for the block's positions from its
//      strided, any-dtype source into a float32 (float64 for double inputs)
//      staging buffer, one zero-padded tile after the other, and normalised;
//   2. per tile, forward: sum psi(x - y) over the tile for every pair of the
//      group, with 4 x 2 register blocking (each loaded vector serves 2 or 4
//      pairs), into that tile's row of float64 partial sums;
//      backward: g_x = sum_y w[x, y] psi'(x - y) with 4-row register blocking,
//      then the chain rule through the normalisation, into a staging buffer
//      scattered straight to the strided output.
// Extra memory: per thread, the staged block of one group's gathered rows
// (2B rows of about 128 * C elements for in-batch negatives, 2+K rows for
// explicit ones) and of its gradients; per call, the (tiles, pairs) float64
// partial sums of the forward. Nothing of size B*C*H*W or more exists besides
// the inputs and the gradient outputs (an earlier version repacked the student
// and teacher into a B*C*H*W workspace first: no faster once the gradients
// were scattered straight from the staged block, and 2-3x the memory); the
// forward keeps nothing for the backward.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "facd_cpu.h"

#define FACD_STRINGIFY_IMPL(x) #x
#define FACD_STRINGIFY(x) FACD_STRINGIFY_IMPL(x)

namespace facd {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------
// Moving tiles between strided tensors and (C, positions) buffers.

// offsets[p] = h * stride_h + w * stride_w of position first_position + p.
inline void position_offsets(const FeatureRows& rows, int64_t width, int64_t first_position, int64_t count,
                             int64_t* offsets) {
  for (int64_t p = 0; p < count; ++p) {
    const int64_t position = first_position + p;
    offsets[p] = (position / width) * rows.stride_h + (position % width) * rows.stride_w;
  }
}

// Whether the positions are consecutive elements (the NCHW case): then the
// copies below are plain vectorisable loops instead of indexed ones.
inline bool unit_stride_run(const int64_t* offsets, int64_t count) {
  for (int64_t p = 1; p < count; ++p)
    if (offsets[p] != offsets[0] + p) return false;
  return true;
}

// The layout of one row's staged block: its tiles tile_stride elements apart
// (the rows of a group interleave tile by tile), each a (channels, per_tile)
// row-major tile padded to row_length; the block's `count` positions fill
// them in order (the last tile may be partial).
struct BlockLayout {
  int64_t channels, per_tile, row_length, tile_stride, count;
};

// How many channels ahead the copies prefetch: a channel's run of a block is
// a few cache lines on its own page, too short for the hardware prefetchers
// to pick up, so without this every run waits for memory.
constexpr int64_t kPrefetchChannels = 4;

// Software prefetch (for writing if `write`) of the cache lines of one run.
template <typename E>
inline void prefetch_run(const E* first, int64_t count, bool write) {
  constexpr int64_t kPerLine = 64 / sizeof(E);
  for (int64_t q = 0; q < count; q += kPerLine) {
    if (write) {
      __builtin_prefetch(first + q, 1);
    } else {
      __builtin_prefetch(first + q, 0);
    }
  }
}

// Copies the block's positions of one strided row (offsets: count of them) in.
template <typename T, typename In>
void gather_block(const In* row, int64_t stride_c, const int64_t* offsets, const BlockLayout& layout, T* staged) {
  // Zeros where no position is copied: each tile's padding, and the missing
  // positions of a last, partial tile.
  const int64_t tiles = (layout.count + layout.per_tile - 1) / layout.per_tile;
  const int64_t filled = layout.channels * layout.per_tile;
  for (int64_t tile = 0; tile < tiles; ++tile)
    std::fill(staged + tile * layout.tile_stride + filled, staged + tile * layout.tile_stride + layout.row_length, T(0));
  const int64_t last_valid = layout.count - (tiles - 1) * layout.per_tile;
  if (last_valid < layout.per_tile)
    for (int64_t c = 0; c < layout.channels; ++c) {
      T* last = staged + (tiles - 1) * layout.tile_stride + c * layout.per_tile;
      std::fill(last + last_valid, last + layout.per_tile, T(0));
    }
  const bool contiguous = unit_stride_run(offsets, layout.count);
  for (int64_t c = 0; c < layout.channels; ++c) {
    const In* channel = row + c * stride_c;
    if (contiguous && c + kPrefetchChannels < layout.channels)
      prefetch_run(channel + kPrefetchChannels * stride_c + offsets[0], layout.count, false);
    for (int64_t p = 0; p < layout.count; p += layout.per_tile) {
      const int64_t valid = std::min(layout.per_tile, layout.count - p);
      T* dst = staged + (p / layout.per_tile) * layout.tile_stride + c * layout.per_tile;
      if (contiguous) {
        const In* src = channel + offsets[0] + p;
        for (int64_t q = 0; q < valid; ++q) dst[q] = static_cast<T>(src[q]);
      } else {
        for (int64_t q = 0; q < valid; ++q) dst[q] = static_cast<T>(channel[offsets[p + q]]);
      }
    }
  }
}

// Copies a staged block out to the block's positions of one strided row.
template <typename T, typename Out>
void scatter_block(const T* staged, const BlockLayout& layout, int64_t stride_c, const int64_t* offsets, Out* row) {
  const bool contiguous = unit_stride_run(offsets, layout.count);
  for (int64_t c = 0; c < layout.channels; ++c) {
    Out* channel = row + c * stride_c;
    if (contiguous && c + kPrefetchChannels < layout.channels)
      prefetch_run(channel + kPrefetchChannels * stride_c + offsets[0], layout.count, true);
    for (int64_t p = 0; p < layout.count; p += layout.per_tile) {
      const int64_t valid = std::min(layout.per_tile, layout.count - p);
      const T* src = staged + (p / layout.per_tile) * layout.tile_stride + c * layout.per_tile;
      if (contiguous) {
        Out* dst = channel + offsets[0] + p;
        for (int64_t q = 0; q < valid; ++q) dst[q] = static_cast<Out>(src[q]);
      } else {
        for (int64_t q = 0; q < valid; ++q) channel[offsets[p + q]] = static_cast<Out>(src[q]);
      }
    }
  }
}

// Calls fn(typed pointer) with rows.data cast to its element type.
template <typename Fn>
void with_typed_data(const FeatureRows& rows, Fn&& fn) {
  switch (rows.kind) {
    case ScalarKind::Float16: fn(static_cast<c10::Half*>(rows.data)); break;
    case ScalarKind::BFloat16: fn(static_cast<c10::BFloat16*>(rows.data)); break;
    case ScalarKind::Float32: fn(static_cast<float*>(rows.data)); break;
    case ScalarKind::Float64: fn(static_cast<double*>(rows.data)); break;
  }
}

// ---------------------------------------------------------------------------
// Channel normalisation of a tile row and its backward.

// Both loops below run over `positions` in vectors of positions (one vector
// accumulates the C channels of Vec::size() positions), then a scalar tail.

// tile (C, positions): each position's C-vector over its norm clamped at
// kEpsNorm; clamped_norm[p] receives that divisor.
template <typename T>
void normalize_row(T* tile, int64_t channels, int64_t positions, T* clamped_norm) {
  using Vec = Vectorized<T>;
  const Vec eps(static_cast<T>(kEpsNorm));
  int64_t p = 0;
  for (; p + Vec::size() <= positions; p += Vec::size()) {
    Vec sum_squares(T(0));
    for (int64_t c = 0; c < channels; ++c) {
      const Vec v = Vec::loadu(tile + c * positions + p);
      sum_squares = at::vec::fmadd(v, v, sum_squares);
    }
    const Vec norm = at::vec::maximum(sum_squares.sqrt(), eps);
    norm.store(clamped_norm + p);
    for (int64_t c = 0; c < channels; ++c) (Vec::loadu(tile + c * positions + p) / norm).store(tile + c * positions + p);
  }
  for (; p < positions; ++p) {
    T sum_squares = 0;
    for (int64_t c = 0; c < channels; ++c) sum_squares += tile[c * positions + p] * tile[c * positions + p];
    clamped_norm[p] = std::max(std::sqrt(sum_squares), static_cast<T>(kEpsNorm));
    for (int64_t c = 0; c < channels; ++c) tile[c * positions + p] /= clamped_norm[p];
  }
}

// grad (C, positions) with respect to phi(v) -> with respect to v:
// (g - phi <phi, g>) / ||v|| where ||v|| > kEpsNorm, else g / kEpsNorm.
template <typename T>
void normalize_row_backward(T* grad, const T* phi, int64_t channels, int64_t positions, const T* clamped_norm) {
  using Vec = Vectorized<T>;
  const Vec eps(static_cast<T>(kEpsNorm)), zero(T(0));
  int64_t p = 0;
  for (; p + Vec::size() <= positions; p += Vec::size()) {
    Vec dot(T(0));
    for (int64_t c = 0; c < channels; ++c)
      dot = at::vec::fmadd(Vec::loadu(phi + c * positions + p), Vec::loadu(grad + c * positions + p), dot);
    const Vec norm = Vec::loadu(clamped_norm + p);
    dot = Vec::blendv(zero, dot, norm > eps);  // at the floor phi is v / eps: no projection
    for (int64_t c = 0; c < channels; ++c) {
      const Vec g = Vec::loadu(grad + c * positions + p), f = Vec::loadu(phi + c * positions + p);
      ((g - f * dot) / norm).store(grad + c * positions + p);
    }
  }
  for (; p < positions; ++p) {
    T dot = 0;
    for (int64_t c = 0; c < channels; ++c) dot += phi[c * positions + p] * grad[c * positions + p];
    if (!(clamped_norm[p] > static_cast<T>(kEpsNorm))) dot = 0;
    for (int64_t c = 0; c < channels; ++c)
      grad[c * positions + p] = (grad[c * positions + p] - phi[c * positions + p] * dot) / clamped_norm[p];
  }
}

// ---------------------------------------------------------------------------
// The pair sweeps (the O(pairs * C * H * W) part).

template <typename T>
double lane_sum(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  double total = 0.0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) total += lanes[i];
  return total;
}

// acc + psi(d): |d| for l1, d^2 for l2.
template <Distance D, typename T>
inline Vectorized<T> add_penalty(const Vectorized<T>& acc, const Vectorized<T>& d) {
  if constexpr (D == Distance::L1) {
    return acc + d.abs();
  } else {
    return at::vec::fmadd(d, d, acc);
  }
}

// acc + w psi'(d) with psi'(d) = sign(d) (sign(0) = 0) for l1 and d for l2
// (the factor 2 of d^2 is folded into the weights).
template <Distance D, typename T>
inline Vectorized<T> add_slope(const Vectorized<T>& acc, const Vectorized<T>& d, const Vectorized<T>& w) {
  if constexpr (D == Distance::L1) {
    const Vectorized<T> zero(T(0));
    return acc + ((w & (d > zero)) - (w & (d < zero)));
  } else {
    return at::vec::fmadd(w, d, acc);
  }
}

// out[a * out_stride + b] = sum_e psi(x[a][e] - y[b][e]) for an MX x MY block.
template <typename T, Distance D, int MX, int MY>
void pair_sums_block(const T* const* x, const T* const* y, int64_t length, double* out, int64_t out_stride) {
  using Vec = Vectorized<T>;
  Vec acc[MX][MY];
  for (int a = 0; a < MX; ++a)
    for (int b = 0; b < MY; ++b) acc[a][b] = Vec(T(0));
  for (int64_t e = 0; e < length; e += Vec::size()) {
    Vec yv[MY];
    for (int b = 0; b < MY; ++b) yv[b] = Vec::loadu(y[b] + e);
    for (int a = 0; a < MX; ++a) {
      const Vec xv = Vec::loadu(x[a] + e);
      for (int b = 0; b < MY; ++b) acc[a][b] = add_penalty<D>(acc[a][b], xv - yv[b]);
    }
  }
  for (int a = 0; a < MX; ++a)
    for (int b = 0; b < MY; ++b) out[a * out_stride + b] = lane_sum(acc[a][b]);
}

// out (nx, ny) = pairwise sums of psi over rows of `length` elements.
template <typename T, Distance D>
void pair_sums(const T* const* x, int64_t nx, const T* const* y, int64_t ny, int64_t length, double* out) {
  using Block = void (*)(const T* const*, const T* const*, int64_t, double*, int64_t);
  static constexpr Block kBlocks[4][2] = {
      {&pair_sums_block<T, D, 1, 1>, &pair_sums_block<T, D, 1, 2>},
      {&pair_sums_block<T, D, 2, 1>, &pair_sums_block<T, D, 2, 2>},
      {&pair_sums_block<T, D, 3, 1>, &pair_sums_block<T, D, 3, 2>},
      {&pair_sums_block<T, D, 4, 1>, &pair_sums_block<T, D, 4, 2>},
  };
  for (int64_t a = 0; a < nx; a += 4) {
    const int64_t mx = std::min<int64_t>(4, nx - a);
    for (int64_t b = 0; b < ny; b += 2) {
      const int64_t my = std::min<int64_t>(2, ny - b);
      kBlocks[mx - 1][my - 1](x + a, y + b, length, out + a * ny + b, ny);
    }
  }
}

// g[a][e] = sum_b w[a * ny + b] psi'(x[a][e] - y[b][e]) for MX rows a.
template <typename T, Distance D, int MX>
void weighted_slopes_block(const T* const* x, const T* const* y, int64_t ny, const T* w, int64_t length,
                           T* const* g) {
  using Vec = Vectorized<T>;
  for (int64_t e = 0; e < length; e += Vec::size()) {
    Vec xv[MX], acc[MX];
    for (int a = 0; a < MX; ++a) {
      xv[a] = Vec::loadu(x[a] + e);
      acc[a] = Vec(T(0));
    }
    for (int64_t b = 0; b < ny; ++b) {
      const Vec yv = Vec::loadu(y[b] + e);
      for (int a = 0; a < MX; ++a) acc[a] = add_slope<D>(acc[a], xv[a] - yv, Vec(w[a * ny + b]));
    }
    for (int a = 0; a < MX; ++a) acc[a].store(g[a] + e);
  }
}

// g (nx rows) = weighted psi' sums against every y row; w is (nx, ny).
template <typename T, Distance D>
void weighted_slopes(const T* const* x, int64_t nx, const T* const* y, int64_t ny, const T* w, int64_t length,
                     T* const* g) {
  using Block = void (*)(const T* const*, const T* const*, int64_t, const T*, int64_t, T* const*);
  static constexpr Block kBlocks[4] = {
      &weighted_slopes_block<T, D, 1>, &weighted_slopes_block<T, D, 2>,
      &weighted_slopes_block<T, D, 3>, &weighted_slopes_block<T, D, 4>};
  for (int64_t a = 0; a < nx; a += 4) {
    const int64_t mx = std::min<int64_t>(4, nx - a);
    kBlocks[mx - 1](x + a, y, ny, w + a * ny, length, g + a);
  }
}

// ---------------------------------------------------------------------------
// Tiles of one group's rows.

enum Source { kStudent = 0, kTeacher = 1, kNegatives = 2 };

struct RowRef {
  Source source;
  int64_t row;
};

// The staged block of one group's rows; one per thread, reused across blocks.
template <typename T>
class GroupBlock {
 public:
  explicit GroupBlock(const DistanceProblem& problem)
      : problem_(problem),
        sources_{&problem.student, &problem.teacher, &problem.negatives},
        offsets_(3 * block_positions()) {
    const int64_t rows = problem.group_students() + problem.group_targets();
    values_.resize(rows * problem.tiles_per_block * problem.row_length);
    norms_.resize(rows * problem.tiles_per_block * problem.positions_per_tile);
    pointers_.resize(rows);
  }

  int64_t first_tile() const { return first_tile_; }
  int64_t tiles() const { return tiles_; }
  // Staged blocks of `rows` rows: tile-major, a tile's rows one after the other.
  BlockLayout layout(int64_t rows) const {
    return {problem_.channels, problem_.positions_per_tile, problem_.row_length, rows * problem_.row_length, count_};
  }

  void begin_block(int64_t block) {
    first_tile_ = block * problem_.tiles_per_block;
    tiles_ = std::min(problem_.tiles_per_block, problem_.tiles - first_tile_);
    first_position_ = first_tile_ * problem_.positions_per_tile;
    count_ = std::min(tiles_ * problem_.positions_per_tile, problem_.height * problem_.width - first_position_);
    for (int source = 0; source < 3; ++source)
      if (sources_[source]->data != nullptr)
        block_offsets(*sources_[source], offsets_.data() + source * block_positions());
  }

  // Offsets of the block's positions in a tensor with the rows' layout (an input or a gradient output).
  void block_offsets(const FeatureRows& rows, int64_t* offsets) const {
    position_offsets(rows, problem_.width, first_position_, count_, offsets);
  }

  // Row `index` of a group: students first, then targets.
  RowRef row(int64_t group, int64_t index) const {
    const int64_t students = problem_.group_students();
    if (index < students) return {kStudent, problem_.in_batch() ? index : group};
    const int64_t target = index - students;
    if (problem_.in_batch()) return {kTeacher, target};
    if (target == 0) return {kTeacher, group};
    return {kNegatives, group * problem_.negatives_per_patch + target - 1};
  }

  // Gathers (and normalises) the block of every row of `group`.
  void load_group(int64_t group) {
    const int64_t rows = problem_.group_students() + problem_.group_targets();
    const int64_t positions = problem_.positions_per_tile;
    for (int64_t index = 0; index < rows; ++index) {
      const RowRef ref = row(group, index);
      const FeatureRows& source = *sources_[ref.source];
      T* staged = values_.data() + index * problem_.row_length;
      with_typed_data(source, [&](auto* data) {
        gather_block(data + source.row_offset(ref.row), source.stride_c,
                     offsets_.data() + ref.source * block_positions(), layout(rows), staged);
      });
      if (problem_.normalize)
        for (int64_t tile = 0; tile < tiles_; ++tile)
          normalize_row(staged + tile * rows * problem_.row_length, problem_.channels, positions,
                        norm_pointer(index, tile));
    }
  }

  // The loaded group's rows at tile `tile` of the block, students first.
  const T* const* pointers(int64_t tile) {
    const int64_t rows = static_cast<int64_t>(pointers_.size());
    for (int64_t index = 0; index < rows; ++index)
      pointers_[index] = values_.data() + (tile * rows + index) * problem_.row_length;
    return pointers_.data();
  }
  const T* norms(int64_t index, int64_t tile) { return norm_pointer(index, tile); }

 private:
  int64_t block_positions() const { return problem_.tiles_per_block * problem_.positions_per_tile; }
  T* norm_pointer(int64_t index, int64_t tile) {
    return norms_.data() + (index * problem_.tiles_per_block + tile) * problem_.positions_per_tile;
  }

  const DistanceProblem& problem_;
  const FeatureRows* sources_[3];
  std::vector<int64_t> offsets_;
  std::vector<T> values_, norms_;
  std::vector<const T*> pointers_;
  int64_t first_tile_ = 0, tiles_ = 0, first_position_ = 0, count_ = 0;
};

// ---------------------------------------------------------------------------
// Entry points.

template <typename T, Distance D>
void distance_sums_impl(const DistanceProblem& problem, int64_t block_begin, int64_t block_end, double* partial) {
  GroupBlock<T> rows(problem);
  const int64_t students = problem.group_students(), targets = problem.group_targets();
  for (int64_t block = block_begin; block < block_end; ++block) {
    rows.begin_block(block);
    for (int64_t group = 0; group < problem.groups(); ++group) {
      rows.load_group(group);
      for (int64_t tile = 0; tile < rows.tiles(); ++tile) {
        const T* const* x = rows.pointers(tile);
        pair_sums<T, D>(x, students, x + students, targets, problem.row_length,
                        partial + (rows.first_tile() + tile) * problem.pairs() + group * students * targets);
      }
    }
  }
}

// One side of a group's gradient over the block: the `subjects` rows (indices
// into the group) against the `others` (the other side's rows), with weights
// (subjects, others), staged in `grads` and then scattered to the outputs.
template <typename T, Distance D>
void side_gradients(const DistanceProblem& problem, GroupBlock<T>& rows, int64_t group,
                    const std::vector<int64_t>& subjects, int64_t others_first, int64_t n_others, const T* weights,
                    const GradientOutputs& outputs, std::vector<T>& grads, std::vector<int64_t>& out_offsets) {
  const int64_t n = static_cast<int64_t>(subjects.size());
  if (n == 0) return;
  const int64_t length = problem.row_length;
  grads.resize(problem.tiles_per_block * n * length);  // staged like the inputs: tile-major
  std::vector<const T*> x(n);
  std::vector<T*> g(n);
  for (int64_t tile = 0; tile < rows.tiles(); ++tile) {
    const T* const* tile_rows = rows.pointers(tile);
    for (int64_t s = 0; s < n; ++s) {
      x[s] = tile_rows[subjects[s]];
      g[s] = grads.data() + (tile * n + s) * length;
    }
    weighted_slopes<T, D>(x.data(), n, tile_rows + others_first, n_others, weights, length, g.data());
    if (problem.normalize)
      for (int64_t s = 0; s < n; ++s)
        normalize_row_backward(g[s], x[s], problem.channels, problem.positions_per_tile,
                               rows.norms(subjects[s], tile));
  }
  const FeatureRows* destinations[3] = {&outputs.student, &outputs.teacher, &outputs.negatives};
  for (int64_t s = 0; s < n; ++s) {
    const RowRef ref = rows.row(group, subjects[s]);
    const FeatureRows& out = *destinations[ref.source];
    rows.block_offsets(out, out_offsets.data());
    with_typed_data(out, [&](auto* data) {
      scatter_block(grads.data() + s * length, rows.layout(n), out.stride_c, out_offsets.data(),
                    data + out.row_offset(ref.row));
    });
  }
}

template <typename T, Distance D>
void distance_gradients_impl(const DistanceProblem& problem, const double* weights, const GradientOutputs& outputs,
                             int64_t block_begin, int64_t block_end) {
  GroupBlock<T> rows(problem);
  const int64_t students = problem.group_students(), targets = problem.group_targets();
  const FeatureRows* destinations[3] = {&outputs.student, &outputs.teacher, &outputs.negatives};
  // Which rows of a group get a gradient (the same for every group).
  std::vector<int64_t> student_rows, target_rows;
  for (int64_t index = 0; index < students + targets; ++index) {
    if (destinations[rows.row(0, index).source]->data == nullptr) continue;
    (index < students ? student_rows : target_rows).push_back(index);
  }
  std::vector<T> student_weights(students * targets), target_weights(target_rows.size() * students), grads;
  std::vector<int64_t> out_offsets(problem.tiles_per_block * problem.positions_per_tile);
  for (int64_t block = block_begin; block < block_end; ++block) {
    rows.begin_block(block);
    for (int64_t group = 0; group < problem.groups(); ++group) {
      const double* w = weights + group * students * targets;  // (students, targets)
      for (int64_t i = 0; i < students * targets; ++i) student_weights[i] = static_cast<T>(w[i]);
      for (size_t t = 0; t < target_rows.size(); ++t)
        for (int64_t a = 0; a < students; ++a)
          target_weights[t * students + a] = static_cast<T>(w[a * targets + target_rows[t] - students]);
      rows.load_group(group);
      // psi' is odd, so the targets' gradient is the same sweep with the roles swapped.
      side_gradients<T, D>(problem, rows, group, student_rows, students, targets, student_weights.data(), outputs,
                           grads, out_offsets);
      side_gradients<T, D>(problem, rows, group, target_rows, 0, students, target_weights.data(), outputs, grads,
                           out_offsets);
    }
  }
}

inline void distance_sums(const DistanceProblem& problem, int64_t block_begin, int64_t block_end, double* partial) {
  const bool l1 = problem.distance == Distance::L1;
  if (problem.compute_in_double) {
    (l1 ? distance_sums_impl<double, Distance::L1> : distance_sums_impl<double, Distance::L2>)(
        problem, block_begin, block_end, partial);
  } else {
    (l1 ? distance_sums_impl<float, Distance::L1> : distance_sums_impl<float, Distance::L2>)(
        problem, block_begin, block_end, partial);
  }
}

inline void distance_gradients(const DistanceProblem& problem, const double* weights, const GradientOutputs& outputs,
                               int64_t block_begin, int64_t block_end) {
  const bool l1 = problem.distance == Distance::L1;
  if (problem.compute_in_double) {
    (l1 ? distance_gradients_impl<double, Distance::L1> : distance_gradients_impl<double, Distance::L2>)(
        problem, weights, outputs, block_begin, block_end);
  } else {
    (l1 ? distance_gradients_impl<float, Distance::L1> : distance_gradients_impl<float, Distance::L2>)(
        problem, weights, outputs, block_begin, block_end);
  }
}

inline const KernelTable* kernel_table() {
  static const KernelTable table{FACD_STRINGIFY(CPU_CAPABILITY), &distance_sums, &distance_gradients};
  return &table;
}

}  // namespace CPU_CAPABILITY
}  // namespace facd
