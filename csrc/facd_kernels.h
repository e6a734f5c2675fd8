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
// In-batch negatives have their own entry points (in_batch_sums,
// in_batch_gradients): l1's one B x B sweep can also keep, per element,
// sign(s_i - t_i) and the sum over k != i of sign(s_i - t_k) (a SignState,
// 2 bytes per student element), and the student's backward is then one
// elementwise pass over them plus the normalisation's chain rule; l2 needs no
// pairs at all (closed form through the per-element teacher mean), forward
// and backward.
// Extra memory: per thread, the staged block of one group's gathered rows
// (2B rows of about 128 * C elements for in-batch negatives, 2+K rows for
// explicit ones) and of its gradients; per call, the (tiles, pairs) float64
// partial sums of the forward. Nothing of size B*C*H*W or more exists besides
// the inputs and the gradient outputs (an earlier version repacked the student
// and teacher into a B*C*H*W workspace first: no faster once the gradients
// were scattered straight from the staged block, and 2-3x the memory); the
// forward keeps nothing for the backward but, when asked (l1, in-batch), the
// SignState.
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
constexpr int64_t kPrefetchChannels = 16;

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

// The usual tile run: kRowAlignment positions (every C >= 64 gives tiles of
// kMinTilePositions = 16). Copied with a compile-time length, it becomes a few
// straight vector instructions instead of a loop whose setup costs more than
// the copy (this run is copied B * C * H * W / 16 times per pass).
constexpr int64_t kShortRun = 16;

template <int64_t N, typename Out, typename In>
inline void convert_run(Out* __restrict dst, const In* __restrict src) {
  for (int64_t q = 0; q < N; ++q) dst[q] = static_cast<Out>(src[q]);
}

template <typename Out, typename In>
inline void convert_run(Out* __restrict dst, const In* __restrict src, int64_t count) {
  if (count == kShortRun) {
    convert_run<kShortRun>(dst, src);
  } else {
    for (int64_t q = 0; q < count; ++q) dst[q] = static_cast<Out>(src[q]);
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
        convert_run(dst, channel + offsets[0] + p, valid);
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
        convert_run(channel + offsets[0] + p, src, valid);
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
    const Vec inverse = Vec(T(1)) / norm;  // one division per position, not per element
    for (int64_t c = 0; c < channels; ++c) (Vec::loadu(tile + c * positions + p) * inverse).store(tile + c * positions + p);
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
    const Vec norm = Vec::loadu(clamped_norm + p), inverse = Vec(T(1)) / norm;
    dot = Vec::blendv(zero, dot, norm > eps);  // at the floor phi is v / eps: no projection
    for (int64_t c = 0; c < channels; ++c) {
      const Vec g = Vec::loadu(grad + c * positions + p), f = Vec::loadu(phi + c * positions + p);
      ((g - f * dot) * inverse).store(grad + c * positions + p);
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
    for (int64_t index = 0; index < rows; ++index)
      stage_row(row(group, index), layout(rows), values_.data() + index * problem_.row_length,
                norm_pointer(index, 0));
  }

  // Gathers (and normalises) one row's block alone into `staged` (layout(1),
  // tiles_per_block * row_length elements), its clamped norms into `norms`
  // (tiles_per_block * positions_per_tile).
  void load_row(const RowRef& ref, T* staged, T* norms) { stage_row(ref, layout(1), staged, norms); }

  // The loaded group's rows at tile `tile` of the block, students first.
  const T* const* pointers(int64_t tile) {
    const int64_t rows = static_cast<int64_t>(pointers_.size());
    for (int64_t index = 0; index < rows; ++index)
      pointers_[index] = values_.data() + (tile * rows + index) * problem_.row_length;
    return pointers_.data();
  }
  const T* norms(int64_t index, int64_t tile) { return norm_pointer(index, tile); }
  // First position of the block, and its number of positions.
  int64_t first_position() const { return first_position_; }
  int64_t count() const { return count_; }

 private:
  int64_t block_positions() const { return problem_.tiles_per_block * problem_.positions_per_tile; }
  // norms: the row's first tile's norms; its later tiles' follow positions_per_tile apart.
  void stage_row(const RowRef& ref, const BlockLayout& to, T* staged, T* norms) {
    const FeatureRows& source = *sources_[ref.source];
    with_typed_data(source, [&](auto* data) {
      gather_block(data + source.row_offset(ref.row), source.stride_c,
                   offsets_.data() + ref.source * block_positions(), to, staged);
    });
    if (problem_.normalize)
      for (int64_t tile = 0; tile < tiles_; ++tile)
        normalize_row(staged + tile * to.tile_stride, problem_.channels, problem_.positions_per_tile,
                      norms + tile * problem_.positions_per_tile);
  }
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
  // A row all of whose weights are 0 gets exactly 0, even where its own
  // features (a masked-out patch's, say) are not finite.
  for (int64_t s = 0; s < n; ++s)
    if (std::all_of(weights + s * n_others, weights + (s + 1) * n_others, [](T w) { return w == T(0); }))
      for (int64_t tile = 0; tile < rows.tiles(); ++tile)
        std::fill_n(grads.data() + (tile * n + s) * length, length, T(0));
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

// ---------------------------------------------------------------------------
// In-batch negatives: l1 sweeps the pairs once and keeps the sign sums the
// student's gradient needs; l2 needs no pairs at all.

// sum + sign(d), sign(0) = 0 (and 0 for NaN). With AVX-512, two compares into
// mask registers and two masked adds: Vectorized's compares would each
// materialise a vector of all-ones lanes first, twice the instructions.
template <typename T>
inline Vectorized<T> add_sign(const Vectorized<T>& sum, const Vectorized<T>& d) {
  const Vectorized<T> zero(T(0)), one(T(1));
  return sum + ((one & (d > zero)) - (one & (d < zero)));
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vectorized<float> add_sign(const Vectorized<float>& sum, const Vectorized<float>& d) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __mmask16 positive = _mm512_cmp_ps_mask(d, zero, _CMP_GT_OQ), negative = _mm512_cmp_ps_mask(d, zero, _CMP_LT_OQ);
  const __m512 raised = _mm512_mask_add_ps(sum, positive, sum, one);
  return _mm512_mask_sub_ps(raised, negative, raised, one);
}

template <>
inline Vectorized<double> add_sign(const Vectorized<double>& sum, const Vectorized<double>& d) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  const __mmask8 positive = _mm512_cmp_pd_mask(d, zero, _CMP_GT_OQ), negative = _mm512_cmp_pd_mask(d, zero, _CMP_LT_OQ);
  const __m512d raised = _mm512_mask_add_pd(sum, positive, sum, one);
  return _mm512_mask_sub_pd(raised, negative, raised, one);
}
#endif

// Targets per block of the l1 sign sweep: 4 where 32 vector registers hold the
// 4 x 4 accumulators (AVX-512), else 2.
constexpr int kSignTargets = Vectorized<float>::size() >= 16 ? 4 : 2;

// out[a * out_stride + b] = sum_e |x[a][e] - y[b][e]| for an MX x MY block,
// and signs[a][e] (FIRST: =, else +=) sum_b sign(x[a][e] - y[b][e]).
template <typename T, int MX, int MY, bool FIRST>
void l1_sums_and_signs_block(const T* const* x, const T* const* y, int64_t length, double* out, int64_t out_stride,
                             T* const* signs) {
  using Vec = Vectorized<T>;
  Vec acc[MX][MY];
  for (int a = 0; a < MX; ++a)
    for (int b = 0; b < MY; ++b) acc[a][b] = Vec(T(0));
  for (int64_t e = 0; e < length; e += Vec::size()) {
    Vec yv[MY];
    for (int b = 0; b < MY; ++b) yv[b] = Vec::loadu(y[b] + e);
    for (int a = 0; a < MX; ++a) {
      const Vec xv = Vec::loadu(x[a] + e);
      Vec sum = FIRST ? Vec(T(0)) : Vec::loadu(signs[a] + e);
      for (int b = 0; b < MY; ++b) {
        const Vec d = xv - yv[b];
        acc[a][b] = acc[a][b] + d.abs();
        sum = add_sign(sum, d);
      }
      sum.store(signs[a] + e);
    }
  }
  for (int a = 0; a < MX; ++a)
    for (int b = 0; b < MY; ++b) out[a * out_stride + b] = lane_sum(acc[a][b]);
}

// out (nx, ny) = pairwise sums of |x - y|, and signs[a] = sum over every y
// row of sign(x[a] - y[b]), elementwise (exact: small integers in T).
template <typename T>
void l1_sums_and_signs(const T* const* x, int64_t nx, const T* const* y, int64_t ny, int64_t length, double* out,
                       T* const* signs) {
  using Block = void (*)(const T* const*, const T* const*, int64_t, double*, int64_t, T* const*);
#define FACD_SIGN_BLOCKS(FIRST, MX)                                                                      \
  {                                                                                                      \
    &l1_sums_and_signs_block<T, MX, 1, FIRST>, &l1_sums_and_signs_block<T, MX, 2, FIRST>,                \
        &l1_sums_and_signs_block<T, MX, 3, FIRST>, &l1_sums_and_signs_block<T, MX, 4, FIRST>             \
  }
  static constexpr Block kBlocks[2][4][4] = {
      {FACD_SIGN_BLOCKS(false, 1), FACD_SIGN_BLOCKS(false, 2), FACD_SIGN_BLOCKS(false, 3),
       FACD_SIGN_BLOCKS(false, 4)},
      {FACD_SIGN_BLOCKS(true, 1), FACD_SIGN_BLOCKS(true, 2), FACD_SIGN_BLOCKS(true, 3), FACD_SIGN_BLOCKS(true, 4)},
  };
#undef FACD_SIGN_BLOCKS
  for (int64_t a = 0; a < nx; a += 4) {
    const int64_t mx = std::min<int64_t>(4, nx - a);
    for (int64_t b = 0; b < ny; b += kSignTargets) {
      const int64_t my = std::min<int64_t>(kSignTargets, ny - b);
      kBlocks[b == 0][mx - 1][my - 1](x + a, y + b, length, out + a * ny + b, ny, signs + a);
    }
  }
}

// Where tile `tile` (of the whole position space) of row `row` starts in a SignState plane.
inline int64_t sign_state_offset(const DistanceProblem& problem, int64_t row, int64_t tile) {
  const int64_t positions = problem.height * problem.width;
  return (row * positions + tile * problem.positions_per_tile) * problem.channels;
}

// Positions of tile `tile` that exist (the last tile may be partial).
inline int64_t valid_positions(const DistanceProblem& problem, int64_t tile) {
  return std::min(problem.positions_per_tile, problem.height * problem.width - tile * problem.positions_per_tile);
}

// positive[q] = sign(x[q] - y[q]), negative[q] = signs[q] - positive[q] (a
// run of one channel; plain loops over restrict pointers, which the compiler
// vectorises, narrowing included).
template <typename S, typename T>
void store_sign_run(const T* __restrict x, const T* __restrict y, const T* __restrict signs, S* __restrict positive,
                    S* __restrict negative, int64_t count) {
  for (int64_t q = 0; q < count; ++q) {
    const T d = x[q] - y[q];
    const int sign = (d > T(0)) - (d < T(0));
    positive[q] = static_cast<S>(sign);
    negative[q] = static_cast<S>(static_cast<int>(signs[q]) - sign);
  }
}

// g[q] = a * positive[q] + b * negative[q] for a run of one channel.
template <typename S, typename T>
void weigh_sign_run(const S* __restrict positive, const S* __restrict negative, T a, T b, T* __restrict g,
                    int64_t count) {
  for (int64_t q = 0; q < count; ++q) g[q] = a * static_cast<T>(positive[q]) + b * static_cast<T>(negative[q]);
}

// Writes one tile of row i's SignState: sign(x - y) and signs - sign(x - y).
template <typename S, typename T>
void store_signs(const DistanceProblem& problem, int64_t row, int64_t tile, const T* x, const T* y,
                 const T* signs, S* state, int64_t plane) {
  const int64_t valid = valid_positions(problem, tile), per_tile = problem.positions_per_tile;
  S* positive = state + sign_state_offset(problem, row, tile);
  if (valid == per_tile) {  // a full tile: staged and kept layouts agree, one run
    store_sign_run(x, y, signs, positive, positive + plane, problem.channels * per_tile);
    return;
  }
  for (int64_t c = 0; c < problem.channels; ++c)
    store_sign_run(x + c * per_tile, y + c * per_tile, signs + c * per_tile, positive + c * valid,
                   positive + plane + c * valid, valid);
}

// l2 closed form over one tile: mean[e] = mean_k y[k][e]; out[2i] = sum_e
// (x_i - y_i)^2, out[2i + 1] = sum_e B (x_i - mean)^2 + (y_k - mean)^2 summed
// over k, minus out[2i]: the sum over k != i of (x_i - y_k)^2, with the
// teacher rows centred first (no cancellation between B a^2 and Q).
template <typename T>
void tile_mean(const T* const* y, int64_t batch, int64_t length, T* mean) {
  using Vec = Vectorized<T>;
  const Vec count(static_cast<T>(batch));
  for (int64_t e = 0; e < length; e += Vec::size()) {
    Vec sum(T(0));
    for (int64_t k = 0; k < batch; ++k) sum = sum + Vec::loadu(y[k] + e);
    (sum / count).store(mean + e);
  }
}

template <typename T>
void l2_in_batch_tile_sums(const T* const* x, const T* const* y, int64_t batch, int64_t length, T* mean,
                           double* out) {
  using Vec = Vectorized<T>;
  tile_mean(y, batch, length, mean);
  Vec spread(T(0));
  for (int64_t k = 0; k < batch; ++k)
    for (int64_t e = 0; e < length; e += Vec::size()) {
      const Vec d = Vec::loadu(y[k] + e) - Vec::loadu(mean + e);
      spread = at::vec::fmadd(d, d, spread);
    }
  const double total_spread = lane_sum(spread);
  for (int64_t i = 0; i < batch; ++i) {
    Vec positive(T(0)), deviation(T(0));
    for (int64_t e = 0; e < length; e += Vec::size()) {
      const Vec xv = Vec::loadu(x[i] + e);
      const Vec dp = xv - Vec::loadu(y[i] + e), dm = xv - Vec::loadu(mean + e);
      positive = at::vec::fmadd(dp, dp, positive);
      deviation = at::vec::fmadd(dm, dm, deviation);
    }
    out[2 * i] = lane_sum(positive);
    out[2 * i + 1] = static_cast<double>(batch) * lane_sum(deviation) + total_spread - out[2 * i];
  }
}

template <typename S, typename T, Distance D>
void in_batch_sums_impl(const DistanceProblem& problem, int64_t block_begin, int64_t block_end, double* partial,
                        const SignState& state) {
  GroupBlock<T> rows(problem);
  const int64_t batch = problem.batch, length = problem.row_length;
  const bool keep = D == Distance::L1 && state.data != nullptr;
  std::vector<double> pairs(D == Distance::L1 ? batch * batch : 0);
  std::vector<T> scratch(keep ? batch * length : length);
  std::vector<T*> signs(batch);
  for (int64_t i = 0; i < batch; ++i) signs[i] = scratch.data() + (keep ? i * length : 0);
  for (int64_t block = block_begin; block < block_end; ++block) {
    rows.begin_block(block);
    rows.load_group(0);
    for (int64_t tile = 0; tile < rows.tiles(); ++tile) {
      const T* const* x = rows.pointers(tile);
      const T* const* y = x + batch;
      double* out = partial + (rows.first_tile() + tile) * batch * 2;
      if constexpr (D == Distance::L2) {
        l2_in_batch_tile_sums(x, y, batch, length, scratch.data(), out);
      } else {
        if (keep) {
          l1_sums_and_signs(x, batch, y, batch, length, pairs.data(), signs.data());
          for (int64_t i = 0; i < batch; ++i)
            store_signs(problem, i, rows.first_tile() + tile, x[i], y[i], signs[i], static_cast<S*>(state.data),
                        state.plane);
        } else {
          pair_sums<T, Distance::L1>(x, batch, y, batch, length, pairs.data());
        }
        for (int64_t i = 0; i < batch; ++i) {
          double negative = 0.0;
          for (int64_t k = 0; k < batch; ++k)
            if (k != i) negative += pairs[i * batch + k];
          out[2 * i] = pairs[i * batch + i];
          out[2 * i + 1] = negative;
        }
      }
    }
  }
}

// Scatters a gradient row staged as layout(1) to row `row` of `out`.
template <typename T>
void scatter_row(GroupBlock<T>& rows, const T* grads, const FeatureRows& out, int64_t row, int64_t* out_offsets) {
  rows.block_offsets(out, out_offsets);
  with_typed_data(out, [&](auto* data) {
    scatter_block(grads, rows.layout(1), out.stride_c, out_offsets, data + out.row_offset(row));
  });
}

// The student's l1 gradient from the SignState, row by row: per element
// g_hat = grad_pos_i / N * sign_pos + grad_neg_i / (N (B - 1)) * sign_neg,
// then the chain rule through the normalisation (the student row is read
// once more for it; without normalisation it is not read at all).
template <typename S, typename T>
void l1_student_gradients(const DistanceProblem& problem, const double* grad_pos, const double* grad_neg,
                          const SignState& state, const FeatureRows& out, int64_t block_begin, int64_t block_end) {
  GroupBlock<T> rows(problem);
  const int64_t batch = problem.batch, length = problem.row_length, per_tile = problem.positions_per_tile;
  const double elements = static_cast<double>(problem.channels * problem.height * problem.width);
  std::vector<T> staged(problem.tiles_per_block * length), norms(problem.tiles_per_block * per_tile),
      grads(problem.tiles_per_block * length);
  std::vector<int64_t> out_offsets(problem.tiles_per_block * per_tile);
  const S* state_data = static_cast<const S*>(state.data);
  for (int64_t block = block_begin; block < block_end; ++block) {
    rows.begin_block(block);
    for (int64_t i = 0; i < batch; ++i) {
      const T a = static_cast<T>(grad_pos[i] / elements);
      const T b = static_cast<T>(grad_neg[i] / (elements * static_cast<double>(batch - 1)));
      if (a == T(0) && b == T(0)) {
        std::fill(grads.begin(), grads.end(), T(0));
        scatter_row(rows, grads.data(), out, i, out_offsets.data());
        continue;
      }
      if (problem.normalize) rows.load_row({kStudent, i}, staged.data(), norms.data());
      for (int64_t tile = 0; tile < rows.tiles(); ++tile) {
        const int64_t global_tile = rows.first_tile() + tile, valid = valid_positions(problem, global_tile);
        const S* positive = state_data + sign_state_offset(problem, i, global_tile);
        const S* negative = positive + state.plane;
        T* g = grads.data() + tile * length;
        const int64_t filled = problem.channels * per_tile;
        std::fill(g + filled, g + length, T(0));
        if (valid == per_tile) {  // a full tile: staged and kept layouts agree, one run
          weigh_sign_run(positive, negative, a, b, g, filled);
        } else {
          std::fill(g, g + filled, T(0));
          for (int64_t c = 0; c < problem.channels; ++c)
            weigh_sign_run(positive + c * valid, negative + c * valid, a, b, g + c * per_tile, valid);
        }
        if (problem.normalize)
          normalize_row_backward(g, staged.data() + tile * length, problem.channels, per_tile,
                                 norms.data() + tile * per_tile);
      }
      scatter_row(rows, grads.data(), out, i, out_offsets.data());
    }
  }
}

// l2 in closed form, student and teacher, with w_i = grad_neg_i / (B - 1), m = mean_k t_hat_k:
//   g_hat(s_i) = 2/N [(grad_pos_i - w_i)(s_i - t_i) + B w_i (s_i - m)]
//   g_hat(t_k) = -2/N [grad_pos_k (s_k - t_k) + sum_{i != k} w_i s_i - (sum_{i != k} w_i) t_k]
// Student rows with zero weights are never read.
template <typename T>
void l2_in_batch_gradients(const DistanceProblem& problem, const double* grad_pos, const double* grad_neg,
                           const GradientOutputs& outputs, int64_t block_begin, int64_t block_end) {
  GroupBlock<T> rows(problem);
  using Vec = Vectorized<T>;
  const int64_t batch = problem.batch, length = problem.row_length, per_tile = problem.positions_per_tile;
  const int64_t tiles = problem.tiles_per_block;
  const double scale = 2.0 / static_cast<double>(problem.channels * problem.height * problem.width);
  std::vector<double> w(batch);
  double total_weight = 0.0;
  for (int64_t i = 0; i < batch; ++i) {
    w[i] = grad_neg[i] / static_cast<double>(batch - 1);
    total_weight += w[i];
  }
  const bool students = outputs.student.data != nullptr, teachers = outputs.teacher.data != nullptr;
  std::vector<T> mean(tiles * length), weighted(teachers ? tiles * length : 0), grads(tiles * length);
  std::vector<int64_t> out_offsets(tiles * per_tile);
  for (int64_t block = block_begin; block < block_end; ++block) {
    rows.begin_block(block);
    rows.load_group(0);
    for (int64_t tile = 0; tile < rows.tiles(); ++tile) {
      const T* const* x = rows.pointers(tile);
      tile_mean(x + batch, batch, length, mean.data() + tile * length);
      if (!teachers) continue;
      T* sw = weighted.data() + tile * length;
      std::fill(sw, sw + length, T(0));
      for (int64_t i = 0; i < batch; ++i) {
        if (w[i] == 0.0) continue;
        const Vec wi(static_cast<T>(w[i]));
        for (int64_t e = 0; e < length; e += Vec::size())
          at::vec::fmadd(wi, Vec::loadu(x[i] + e), Vec::loadu(sw + e)).store(sw + e);
      }
    }
    for (int64_t i = 0; students && i < batch; ++i) {
      const bool zero = grad_pos[i] == 0.0 && grad_neg[i] == 0.0;
      const Vec c_pos(static_cast<T>(scale * (grad_pos[i] - w[i]))), c_mean(static_cast<T>(scale * batch * w[i]));
      for (int64_t tile = 0; tile < rows.tiles(); ++tile) {
        const T* const* x = rows.pointers(tile);
        T* g = grads.data() + tile * length;
        if (zero) {
          std::fill(g, g + length, T(0));
          continue;
        }
        const T* m = mean.data() + tile * length;
        for (int64_t e = 0; e < length; e += Vec::size()) {
          const Vec s = Vec::loadu(x[i] + e);
          (c_pos * (s - Vec::loadu(x[batch + i] + e)) + c_mean * (s - Vec::loadu(m + e))).store(g + e);
        }
        if (problem.normalize) normalize_row_backward(g, x[i], problem.channels, per_tile, rows.norms(i, tile));
      }
      scatter_row(rows, grads.data(), outputs.student, i, out_offsets.data());
    }
    for (int64_t k = 0; teachers && k < batch; ++k) {
      const Vec c_rest(static_cast<T>(scale * (total_weight - w[k]))), c_sum(static_cast<T>(scale));
      const Vec c_pos(static_cast<T>(-scale * grad_pos[k])), c_own(static_cast<T>(scale * w[k]));
      for (int64_t tile = 0; tile < rows.tiles(); ++tile) {
        const T* const* x = rows.pointers(tile);
        const T* sw = weighted.data() + tile * length;
        T* g = grads.data() + tile * length;
        // -2/N [sum_i w_i s_i - w_k s_k - (W - w_k) t_k + grad_pos_k (s_k - t_k)]
        for (int64_t e = 0; e < length; e += Vec::size()) {
          const Vec t = Vec::loadu(x[batch + k] + e);
          Vec v = c_rest * t - c_sum * Vec::loadu(sw + e);
          if (grad_pos[k] != 0.0) v = v + c_pos * (Vec::loadu(x[k] + e) - t);
          if (w[k] != 0.0) v = v + c_own * Vec::loadu(x[k] + e);
          v.store(g + e);
        }
        if (problem.normalize)
          normalize_row_backward(g, x[batch + k], problem.channels, per_tile, rows.norms(batch + k, tile));
      }
      scatter_row(rows, grads.data(), outputs.teacher, k, out_offsets.data());
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

// Calls fn(S{}, T{}) with S the SignState's integer type and T the compute type.
template <typename Fn>
void with_state_and_compute_types(const DistanceProblem& problem, const SignState& state, Fn&& fn) {
  if (problem.compute_in_double) {
    state.wide ? fn(int16_t{}, double{}) : fn(int8_t{}, double{});
  } else {
    state.wide ? fn(int16_t{}, float{}) : fn(int8_t{}, float{});
  }
}

inline void in_batch_sums(const DistanceProblem& problem, int64_t block_begin, int64_t block_end, double* partial,
                          const SignState& state) {
  with_state_and_compute_types(problem, state, [&](auto s, auto t) {
    using S = decltype(s);
    using T = decltype(t);
    if (problem.distance == Distance::L1) {
      in_batch_sums_impl<S, T, Distance::L1>(problem, block_begin, block_end, partial, state);
    } else {
      in_batch_sums_impl<S, T, Distance::L2>(problem, block_begin, block_end, partial, state);
    }
  });
}

inline void in_batch_gradients(const DistanceProblem& problem, const double* grad_pos, const double* grad_neg,
                               const SignState& state, const GradientOutputs& outputs, int64_t block_begin,
                               int64_t block_end) {
  with_state_and_compute_types(problem, state, [&](auto s, auto t) {
    using S = decltype(s);
    using T = decltype(t);
    if (problem.distance == Distance::L1) {
      l1_student_gradients<S, T>(problem, grad_pos, grad_neg, state, outputs.student, block_begin, block_end);
    } else {
      l2_in_batch_gradients<T>(problem, grad_pos, grad_neg, outputs, block_begin, block_end);
    }
  });
}

inline const KernelTable* kernel_table() {
  static const KernelTable table{FACD_STRINGIFY(CPU_CAPABILITY), &distance_sums, &distance_gradients,
                                 &in_batch_sums, &in_batch_gradients};
  return &table;
}

}  // namespace CPU_CAPABILITY
}  // namespace facd
