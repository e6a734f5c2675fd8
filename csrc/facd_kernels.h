// The fused FACD distance kernels, written once against at::vec::Vectorized<T>
// and compiled once per instruction set: the including translation unit
// defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and the matching
// CPU_CAPABILITY_* macro before including this file, as ATen's own kernels do,
// and gets facd::<CPU_CAPABILITY>::kernel_table().
//
// Algorithm (per tile of consecutive positions, see DistanceProblem):
//   1. gather each needed row's tile (all C channels x the tile's positions)
//      from its strided, any-dtype source into a float32 (float64 for double
//      inputs) buffer laid out (C, positions), zero padded;
//   2. normalize="channel": divide each position's C-vector by its clamped norm
//      (the norm is kept for the backward's chain rule);
//   3. forward: sum psi(x - y) over the tile for every pair of the group with
//      4 x 2 register blocking (each loaded vector serves 2 or 4 pairs);
//      backward: g_x = sum_y w[x, y] psi'(x - y) with 4-row register blocking,
//      then chain through the normalisation and scatter to the strided output.
// Extra memory: per thread, the tiles of one group's rows (2B rows for in-batch
// negatives, 2+K for explicit ones) and their gradients, O(rows * 1024)
// elements; per call, the (tiles, pairs) float64 partial sums of the forward.
// Nothing of size B*B*C*H*W or B*K*C*H*W exists; the forward keeps nothing.
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

// offsets[p] = h * stride_h + w * stride_w of the tile's p-th position.
inline void position_offsets(const FeatureRows& rows, int64_t width, int64_t first_position, int64_t valid,
                             int64_t* offsets) {
  for (int64_t p = 0; p < valid; ++p) {
    const int64_t position = first_position + p;
    offsets[p] = (position / width) * rows.stride_h + (position % width) * rows.stride_w;
  }
}

template <typename T, typename In>
void gather_typed(const In* row, int64_t stride_c, const int64_t* offsets, int64_t channels, int64_t positions,
                  int64_t valid, int64_t row_length, T* tile) {
  std::fill(tile, tile + row_length, T(0));
  for (int64_t c = 0; c < channels; ++c) {
    const In* channel = row + c * stride_c;
    T* dst = tile + c * positions;
    for (int64_t p = 0; p < valid; ++p) dst[p] = static_cast<T>(channel[offsets[p]]);
  }
}

template <typename T, typename Out>
void scatter_typed(const T* tile, int64_t stride_c, const int64_t* offsets, int64_t channels, int64_t positions,
                   int64_t valid, Out* row) {
  for (int64_t c = 0; c < channels; ++c) {
    const T* src = tile + c * positions;
    Out* channel = row + c * stride_c;
    for (int64_t p = 0; p < valid; ++p) channel[offsets[p]] = static_cast<Out>(src[p]);
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

// tile (C, positions): each position's C-vector over its norm clamped at
// kEpsNorm; clamped_norm[p] receives that divisor. sum_squares: scratch of `positions`.
template <typename T>
void normalize_row(T* tile, int64_t channels, int64_t positions, T* clamped_norm, double* sum_squares) {
  std::fill(sum_squares, sum_squares + positions, 0.0);
  for (int64_t c = 0; c < channels; ++c) {
    const T* v = tile + c * positions;
    for (int64_t p = 0; p < positions; ++p) sum_squares[p] += static_cast<double>(v[p]) * v[p];
  }
  for (int64_t p = 0; p < positions; ++p)
    clamped_norm[p] = static_cast<T>(std::max(std::sqrt(sum_squares[p]), kEpsNorm));
  for (int64_t c = 0; c < channels; ++c) {
    T* v = tile + c * positions;
    for (int64_t p = 0; p < positions; ++p) v[p] /= clamped_norm[p];
  }
}

// grad (C, positions) with respect to phi(v) -> with respect to v:
// (g - phi <phi, g>) / ||v|| where ||v|| > kEpsNorm, else g / kEpsNorm.
template <typename T>
void normalize_row_backward(T* grad, const T* phi, int64_t channels, int64_t positions, const T* clamped_norm,
                            double* dots) {
  std::fill(dots, dots + positions, 0.0);
  for (int64_t c = 0; c < channels; ++c) {
    const T* g = grad + c * positions;
    const T* f = phi + c * positions;
    for (int64_t p = 0; p < positions; ++p) dots[p] += static_cast<double>(f[p]) * g[p];
  }
  for (int64_t c = 0; c < channels; ++c) {
    T* g = grad + c * positions;
    const T* f = phi + c * positions;
    for (int64_t p = 0; p < positions; ++p) {
      const T projected = clamped_norm[p] > static_cast<T>(kEpsNorm) ? g[p] - f[p] * static_cast<T>(dots[p]) : g[p];
      g[p] = projected / clamped_norm[p];
    }
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

// The buffers one thread reuses across its tiles.
template <typename T>
class GroupTiles {
 public:
  explicit GroupTiles(const DistanceProblem& problem)
      : problem_(problem),
        sources_{&problem.student, &problem.teacher, &problem.negatives},
        offsets_(3 * problem.positions_per_tile),
        scratch_(problem.positions_per_tile) {
    const int64_t rows = problem.group_students() + problem.group_targets();
    values_.resize(rows * problem.row_length);
    norms_.resize(rows * problem.positions_per_tile);
    pointers_.resize(rows);
  }

  int64_t valid_positions() const { return valid_; }
  const int64_t* offsets(Source source) const { return offsets_.data() + source * problem_.positions_per_tile; }
  double* scratch() { return scratch_.data(); }

  void begin_tile(int64_t tile) {
    first_position_ = tile * problem_.positions_per_tile;
    valid_ = std::min(problem_.positions_per_tile, problem_.height * problem_.width - first_position_);
    for (int source = 0; source < 3; ++source)
      if (sources_[source]->data != nullptr)
        position_offsets(*sources_[source], problem_.width, first_position_, valid_,
                         offsets_.data() + source * problem_.positions_per_tile);
  }

  // Offsets of the current tile's positions in another tensor (a gradient output).
  void output_offsets(const FeatureRows& rows, int64_t* offsets) const {
    position_offsets(rows, problem_.width, first_position_, valid_, offsets);
  }

  // Row `index` of the current group: students first, then targets.
  RowRef row(int64_t group, int64_t index) const {
    const int64_t students = problem_.group_students();
    if (index < students) return {kStudent, problem_.in_batch() ? index : group};
    const int64_t target = index - students;
    if (problem_.in_batch()) return {kTeacher, target};
    if (target == 0) return {kTeacher, group};
    return {kNegatives, group * problem_.negatives_per_patch + target - 1};
  }

  // Gathers (and normalises) every row of `group`; pointers() then lists
  // them, students first.
  void load_group(int64_t group) {
    const int64_t rows = problem_.group_students() + problem_.group_targets();
    const int64_t positions = problem_.positions_per_tile;
    for (int64_t index = 0; index < rows; ++index) {
      const RowRef ref = row(group, index);
      const FeatureRows& source = *sources_[ref.source];
      T* tile = values_.data() + index * problem_.row_length;
      with_typed_data(source, [&](auto* data) {
        gather_typed(data + source.row_offset(ref.row), source.stride_c, offsets(ref.source), problem_.channels,
                     positions, valid_, problem_.row_length, tile);
      });
      if (problem_.normalize)
        normalize_row(tile, problem_.channels, positions, norms_.data() + index * positions, scratch_.data());
      pointers_[index] = tile;
    }
  }

  const T* const* pointers() const { return pointers_.data(); }
  const T* norms(int64_t index) const { return norms_.data() + index * problem_.positions_per_tile; }

 private:
  const DistanceProblem& problem_;
  const FeatureRows* sources_[3];
  std::vector<int64_t> offsets_;
  std::vector<double> scratch_;
  std::vector<T> values_, norms_;
  std::vector<const T*> pointers_;
  int64_t first_position_ = 0, valid_ = 0;
};

// ---------------------------------------------------------------------------
// Entry points.

template <typename T, Distance D>
void distance_sums_impl(const DistanceProblem& problem, int64_t tile_begin, int64_t tile_end, double* partial) {
  GroupTiles<T> tiles(problem);
  const int64_t students = problem.group_students(), targets = problem.group_targets();
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    tiles.begin_tile(tile);
    for (int64_t group = 0; group < problem.groups(); ++group) {
      tiles.load_group(group);
      const T* const* rows = tiles.pointers();
      pair_sums<T, D>(rows, students, rows + students, targets, problem.row_length,
                      partial + tile * problem.pairs() + group * students * targets);
    }
  }
}

// One side of a group's gradient: the `subjects` rows (indices into the
// group) against the `others` rows, with weights (subjects, others).
template <typename T, Distance D>
void side_gradients(const DistanceProblem& problem, GroupTiles<T>& tiles, int64_t group,
                    const std::vector<int64_t>& subjects, const T* const* others, int64_t n_others,
                    const T* weights, const GradientOutputs& outputs, std::vector<T>& grads,
                    std::vector<int64_t>& out_offsets) {
  const int64_t n = static_cast<int64_t>(subjects.size());
  if (n == 0) return;
  const int64_t length = problem.row_length, positions = problem.positions_per_tile;
  grads.resize(n * length);
  std::vector<const T*> x(n);
  std::vector<T*> g(n);
  for (int64_t s = 0; s < n; ++s) {
    x[s] = tiles.pointers()[subjects[s]];
    g[s] = grads.data() + s * length;
  }
  weighted_slopes<T, D>(x.data(), n, others, n_others, weights, length, g.data());
  const FeatureRows* destinations[3] = {&outputs.student, &outputs.teacher, &outputs.negatives};
  for (int64_t s = 0; s < n; ++s) {
    if (problem.normalize)
      normalize_row_backward(g[s], x[s], problem.channels, positions, tiles.norms(subjects[s]), tiles.scratch());
    const RowRef ref = tiles.row(group, subjects[s]);
    const FeatureRows& out = *destinations[ref.source];
    tiles.output_offsets(out, out_offsets.data());
    with_typed_data(out, [&](auto* data) {
      scatter_typed(g[s], out.stride_c, out_offsets.data(), problem.channels, positions, tiles.valid_positions(),
                    data + out.row_offset(ref.row));
    });
  }
}

template <typename T, Distance D>
void distance_gradients_impl(const DistanceProblem& problem, const double* weights, const GradientOutputs& outputs,
                             int64_t tile_begin, int64_t tile_end) {
  GroupTiles<T> tiles(problem);
  const int64_t students = problem.group_students(), targets = problem.group_targets();
  const FeatureRows* destinations[3] = {&outputs.student, &outputs.teacher, &outputs.negatives};
  // Which rows of a group get a gradient (the same for every group).
  std::vector<int64_t> student_rows, target_rows;
  for (int64_t index = 0; index < students + targets; ++index) {
    const RowRef ref = tiles.row(0, index);
    if (destinations[ref.source]->data == nullptr) continue;
    (index < students ? student_rows : target_rows).push_back(index);
  }
  std::vector<T> student_weights(students * targets), target_weights(target_rows.size() * students), grads;
  std::vector<int64_t> out_offsets(problem.positions_per_tile);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    tiles.begin_tile(tile);
    for (int64_t group = 0; group < problem.groups(); ++group) {
      const double* w = weights + group * students * targets;  // (students, targets)
      for (int64_t i = 0; i < students * targets; ++i) student_weights[i] = static_cast<T>(w[i]);
      for (size_t t = 0; t < target_rows.size(); ++t)
        for (int64_t a = 0; a < students; ++a)
          target_weights[t * students + a] = static_cast<T>(w[a * targets + target_rows[t] - students]);
      tiles.load_group(group);
      const T* const* rows = tiles.pointers();
      // psi' is odd, so the targets' gradient is the same sweep with the roles swapped.
      side_gradients<T, D>(problem, tiles, group, student_rows, rows + students, targets, student_weights.data(),
                           outputs, grads, out_offsets);
      side_gradients<T, D>(problem, tiles, group, target_rows, rows, students, target_weights.data(), outputs,
                           grads, out_offsets);
    }
  }
}

inline void distance_sums(const DistanceProblem& problem, int64_t tile_begin, int64_t tile_end, double* partial) {
  const bool l1 = problem.distance == Distance::L1;
  if (problem.compute_in_double) {
    (l1 ? distance_sums_impl<double, Distance::L1> : distance_sums_impl<double, Distance::L2>)(
        problem, tile_begin, tile_end, partial);
  } else {
    (l1 ? distance_sums_impl<float, Distance::L1> : distance_sums_impl<float, Distance::L2>)(
        problem, tile_begin, tile_end, partial);
  }
}

inline void distance_gradients(const DistanceProblem& problem, const double* weights, const GradientOutputs& outputs,
                               int64_t tile_begin, int64_t tile_end) {
  const bool l1 = problem.distance == Distance::L1;
  if (problem.compute_in_double) {
    (l1 ? distance_gradients_impl<double, Distance::L1> : distance_gradients_impl<double, Distance::L2>)(
        problem, weights, outputs, tile_begin, tile_end);
  } else {
    (l1 ? distance_gradients_impl<float, Distance::L1> : distance_gradients_impl<float, Distance::L2>)(
        problem, weights, outputs, tile_begin, tile_end);
  }
}

inline const KernelTable* kernel_table() {
  static const KernelTable table{FACD_STRINGIFY(CPU_CAPABILITY), &distance_sums, &distance_gradients};
  return &table;
}

}  // namespace CPU_CAPABILITY
}  // namespace facd
