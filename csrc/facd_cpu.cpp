// The CPU kernels of the facd_fast ops (schemas in facd_ops.cpp), registered
// for the CPU dispatch key at the end of this file: tensor checks, tiling, the
// parallel loop over tiles and the fixed-order reduction of the per-tile sums.
// The kernels' inner loops are in facd_kernels.h.
//
// This translation unit also compiles the DEFAULT (no ISA flags) instance of
// the kernels, and it is the first source of the link (facd_build.SOURCES
// lists it first): where an inline function from a shared header is compiled
// both here and in an AVX2/AVX-512 unit, the linker keeps this, portable, copy.
#define CPU_CAPABILITY DEFAULT
#include "facd_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

namespace facd {

const KernelTable* default_kernels() { return DEFAULT::kernel_table(); }

namespace {

bool cpu_supports(const char* isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  const std::string name(isa);
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return std::string(isa) == "default";
}

const KernelTable* kernels_named(const std::string& name) {
  if (name == "default") return default_kernels();
  if (name == "avx2") return avx2_kernels();
  if (name == "avx512") return avx512_kernels();
  return nullptr;
}

const KernelTable* best_kernels() {
  static const KernelTable* best = [] {
    for (const char* name : {"avx512", "avx2"})
      if (kernels_named(name) != nullptr && cpu_supports(name)) return kernels_named(name);
    return default_kernels();
  }();
  return best;
}

std::atomic<const KernelTable*> forced_kernels{nullptr};

const KernelTable* active_kernels() {
  const KernelTable* forced = forced_kernels.load();
  return forced != nullptr ? forced : best_kernels();
}

ScalarKind scalar_kind(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kFloat: return ScalarKind::Float32;
    case at::kDouble: return ScalarKind::Float64;
    default: TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  }
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got one on ", x.device());
}

// (B, C, H, W) -> rows b; with `grouped`, (B, K, C, H, W) -> rows b * K + k.
FeatureRows rows_of(const at::Tensor& x, const char* name, bool grouped) {
  check_cpu(x, name);
  const int64_t lead = grouped ? 2 : 1;
  TORCH_CHECK(x.dim() == lead + 3, name, " must have shape ", grouped ? "(B, K, C, H, W)" : "(B, C, H, W)",
              ", got ", x.sizes());
  FeatureRows rows;
  rows.data = x.data_ptr();
  rows.kind = scalar_kind(x, name);
  rows.stride_outer = x.stride(0);
  if (grouped) {
    rows.rows_inner = x.size(1);
    rows.stride_inner = x.stride(1);
  }
  rows.stride_c = x.stride(lead);
  rows.stride_h = x.stride(lead + 1);
  rows.stride_w = x.stride(lead + 2);
  return rows;
}

FeatureRows feature_rows(const at::Tensor& x, const char* name) { return rows_of(x, name, false); }
FeatureRows negative_rows(const at::Tensor& x, const char* name) { return rows_of(x, name, true); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles of about kTileElements elements (positions_per_tile positions x all
// channels), blocks of about kBlockPositions positions: see facd_cpu.h.
void set_tiling(DistanceProblem& problem) {
  const int64_t positions = problem.height * problem.width;
  problem.positions_per_tile =
      std::min(positions, std::max(kMinTilePositions, kTileElements / problem.channels));
  problem.tiles = ceil_div(positions, problem.positions_per_tile);
  // One spare vector of padding: a power-of-two row length would put every
  // row of a staged tile into the same cache sets.
  problem.row_length = (ceil_div(problem.channels * problem.positions_per_tile, kRowAlignment) + 1) * kRowAlignment;
  problem.tiles_per_block = std::min(problem.tiles, ceil_div(kBlockPositions, problem.positions_per_tile));
  problem.blocks = ceil_div(problem.tiles, problem.tiles_per_block);
}

DistanceProblem distance_problem(const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& negatives, const std::string& distance,
                                 const std::string& normalize) {
  TORCH_CHECK(distance == "l1" || distance == "l2", "distance must be 'l1' or 'l2', got '", distance, "'");
  TORCH_CHECK(normalize == "channel" || normalize == "none", "normalize must be 'channel' or 'none', got '",
              normalize, "'");
  DistanceProblem problem;
  problem.student = feature_rows(student, "student");
  problem.teacher = feature_rows(teacher, "teacher");
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher must have the student's shape ", student.sizes(),
              ", got ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "teacher must have the student's dtype ",
                   student.scalar_type(), ", got ", teacher.scalar_type());
  TORCH_CHECK(student.numel() > 0, "student must not be empty, got shape ", student.sizes());
  problem.batch = student.size(0);
  problem.channels = student.size(1);
  problem.height = student.size(2);
  problem.width = student.size(3);
  if (negatives.has_value()) {
    const at::Tensor& n = *negatives;
    problem.negatives = negative_rows(n, "negatives");
    TORCH_CHECK(n.size(0) == problem.batch && n.sizes().slice(2) == student.sizes().slice(1) && n.size(1) > 0,
                "negatives must have shape (", problem.batch, ", K >= 1, ", student.sizes().slice(1),
                ") to match student, got ", n.sizes());
    TORCH_CHECK_TYPE(n.scalar_type() == student.scalar_type(), "negatives must have the student's dtype ",
                     student.scalar_type(), ", got ", n.scalar_type());
    problem.negatives_per_patch = n.size(1);
  } else {
    TORCH_CHECK(problem.batch >= 2, "in-batch negatives need B >= 2, got B=", problem.batch);
  }
  problem.distance = distance == "l1" ? Distance::L1 : Distance::L2;
  problem.normalize = normalize == "channel";
  problem.compute_in_double = student.scalar_type() == at::kDouble;
  set_tiling(problem);
  return problem;
}

// sums[pair] over the whole position space, reduced over tiles in tile order.
std::vector<double> pair_sums(const DistanceProblem& problem) {
  const int64_t pairs = problem.pairs();
  std::vector<double> partial(problem.tiles * pairs);
  const KernelTable* kernels = active_kernels();
  at::parallel_for(0, problem.blocks, 1, [&](int64_t begin, int64_t end) {
    kernels->distance_sums(problem, begin, end, partial.data());
  });
  std::vector<double> sums(pairs, 0.0);
  for (int64_t tile = 0; tile < problem.tiles; ++tile)
    for (int64_t pair = 0; pair < pairs; ++pair) sums[pair] += partial[tile * pairs + pair];
  return sums;
}

// values (float64) copied into a new tensor with `options` (a copy even for
// float64: the vector dies with the caller).
at::Tensor tensor_of(std::vector<double> values, at::IntArrayRef shape, const at::TensorOptions& options) {
  return at::empty(shape, options).copy_(at::from_blob(values.data(), shape, at::kDouble));
}

// An output the caller did not ask for: ops return fresh tensors, never None
// and never an alias of another output.
at::Tensor not_computed(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A one-entry cache of the sign state's memory. Fresh pages cost more than the
// state's whole computation here (torch's CPU allocator returns blocks this
// large to the system, so every training step would fault in and zero 2 bytes
// per student element again): the state of the last step, once its backward
// has run and autograd dropped it, is kept for the next one of the same size.
// Kept between steps: one state (18.9 MB at the EDSR tap).
std::mutex state_cache_mutex;
void* cached_state = nullptr;
size_t cached_state_bytes = 0;

void return_state(void* data, size_t bytes) {
  std::lock_guard<std::mutex> lock(state_cache_mutex);
  if (cached_state != nullptr) c10::free_cpu(cached_state);
  cached_state = data;
  cached_state_bytes = bytes;
}

// An uninitialised contiguous CPU tensor for a sign state, from the cache when it fits.
at::Tensor sign_state_tensor(at::IntArrayRef shape, at::ScalarType dtype) {
  size_t bytes = c10::elementSize(dtype);
  for (const int64_t size : shape) bytes *= static_cast<size_t>(size);
  void* data = nullptr;
  {
    std::lock_guard<std::mutex> lock(state_cache_mutex);
    if (cached_state != nullptr && cached_state_bytes == bytes) {
      data = cached_state;
      cached_state = nullptr;
    }
  }
  if (data == nullptr) data = c10::alloc_cpu(bytes);
  return at::from_blob(data, shape, [bytes](void* released) { return_state(released, bytes); },
                       at::TensorOptions().dtype(dtype).device(at::kCPU));
}

// The SignState in `saved` (see facd_cpu.h): (2, B, C, H, W) contiguous, int8 for B <= 128, else int16.
SignState sign_state(const DistanceProblem& problem, const at::Tensor& saved) {
  check_cpu(saved, "saved");
  TORCH_CHECK(problem.in_batch() && problem.distance == Distance::L1,
              "saved sign sums come only from l1 with in-batch negatives");
  TORCH_CHECK(problem.batch <= 32768, "saved sign sums need B <= 32768, got B=", problem.batch);
  const at::ScalarType expected = problem.batch <= 128 ? at::kChar : at::kShort;
  TORCH_CHECK_TYPE(saved.scalar_type() == expected, "saved must be ", expected, " for B=", problem.batch, ", got ",
                   saved.scalar_type());
  const std::vector<int64_t> shape{2, problem.batch, problem.channels, problem.height, problem.width};
  TORCH_CHECK(saved.sizes() == at::IntArrayRef(shape) && saved.is_contiguous(),
              "saved must be a contiguous tensor of shape ", at::IntArrayRef(shape), ", got ", saved.sizes());
  SignState result;
  result.data = saved.data_ptr();
  result.wide = expected == at::kShort;
  result.plane = problem.batch * problem.channels * problem.height * problem.width;
  return result;
}

}  // namespace

// d_pos, d_neg (B,) in float32 (float64 for float64 inputs), see
// reference.feature_distances. saved: with keep_state, l1 and in-batch
// negatives, the per-element sign sums the student's backward needs (a
// SignState: (2, B, C, H, W) int8 for B <= 128, int16 beyond); else nothing
// (an empty tensor) and the backward re-reads the inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distances(const at::Tensor& student, const at::Tensor& teacher,
                                                                 const std::optional<at::Tensor>& negatives,
                                                                 c10::string_view distance,
                                                                 c10::string_view normalize, bool keep_state) {
  DistanceProblem problem =
      distance_problem(student, teacher, negatives, std::string(distance), std::string(normalize));
  at::Tensor saved = at::empty({0}, student.options().dtype(at::kChar));
  if (keep_state && problem.in_batch() && problem.distance == Distance::L1) {
    TORCH_CHECK(problem.batch <= 32768, "l1 with in-batch negatives keeps its sign sums for B <= 32768, got B=",
                problem.batch);
    saved = sign_state_tensor({2, problem.batch, problem.channels, problem.height, problem.width},
                              problem.batch <= 128 ? at::kChar : at::kShort);
  }
  const double elements = static_cast<double>(problem.channels * problem.height * problem.width);
  const int64_t batch = problem.batch;
  std::vector<double> pos(batch, 0.0), neg(batch, 0.0);
  if (problem.in_batch()) {
    const SignState state = saved.numel() > 0 ? sign_state(problem, saved) : SignState{};
    std::vector<double> partial(problem.tiles * batch * 2);
    const KernelTable* kernels = active_kernels();
    at::parallel_for(0, problem.blocks, 1, [&](int64_t begin, int64_t end) {
      kernels->in_batch_sums(problem, begin, end, partial.data(), state);
    });
    for (int64_t tile = 0; tile < problem.tiles; ++tile)  // in tile order: the same bits for any thread count
      for (int64_t i = 0; i < batch; ++i) {
        pos[i] += partial[(tile * batch + i) * 2];
        neg[i] += partial[(tile * batch + i) * 2 + 1];
      }
    for (int64_t i = 0; i < batch; ++i) {
      pos[i] /= elements;
      neg[i] /= static_cast<double>(batch - 1) * elements;
    }
  } else {
    const std::vector<double> sums = pair_sums(problem);
    const int64_t targets = problem.group_targets();
    for (int64_t i = 0; i < batch; ++i) {
      double negative_total = 0.0;
      for (int64_t k = 1; k < targets; ++k) negative_total += sums[i * targets + k];
      pos[i] = sums[i * targets] / elements;
      neg[i] = negative_total / static_cast<double>(targets - 1) / elements;
    }
  }
  const auto options = student.options().dtype(compute_type(student.scalar_type()));
  return {tensor_of(pos, {batch}, options), tensor_of(neg, {batch}, options), saved};
}

// Gradients of sum_i grad_pos[i] d_pos[i] + grad_neg[i] d_neg[i], each shaped,
// typed and laid out like its input where output_mask asks for it. saved:
// what the forward kept (an empty tensor: nothing).
std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distances_backward(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& negatives, const at::Tensor& saved, c10::string_view distance,
    c10::string_view normalize, std::array<bool, 3> output_mask) {
  DistanceProblem problem =
      distance_problem(student, teacher, negatives, std::string(distance), std::string(normalize));
  const int64_t batch = problem.batch, targets = problem.group_targets();
  for (const auto& [grad, name] : {std::pair{&grad_pos, "grad_pos"}, std::pair{&grad_neg, "grad_neg"}}) {
    check_cpu(*grad, name);
    TORCH_CHECK(grad->sizes() == at::IntArrayRef{batch}, name, " must have shape (", batch, ",), got ",
                grad->sizes());
  }
  TORCH_CHECK(!output_mask[2] || negatives.has_value(),
              "output_mask asks for the negatives' gradient, but there are no explicit negatives "
              "(in-batch negatives are the teacher)");
  at::Tensor grad_student = output_mask[0] ? at::empty_like(student) : not_computed(student);
  at::Tensor grad_teacher = output_mask[1] ? at::empty_like(teacher) : not_computed(student);
  at::Tensor grad_negatives = output_mask[2] ? at::empty_like(*negatives) : not_computed(student);
  GradientOutputs outputs;
  if (output_mask[0]) outputs.student = feature_rows(grad_student, "grad_student");
  if (output_mask[1]) outputs.teacher = feature_rows(grad_teacher, "grad_teacher");
  if (output_mask[2]) outputs.negatives = negative_rows(grad_negatives, "grad_negatives");
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {grad_student, grad_teacher, grad_negatives};
  const KernelTable* kernels = active_kernels();

  // In-batch: l2 in closed form for both; l1's student from the forward's sign
  // sums when it kept them (the teacher's then takes the pair sweep below).
  const bool from_state = problem.in_batch() && output_mask[0] && saved.numel() > 0;
  if (problem.in_batch() && (problem.distance == Distance::L2 || from_state)) {
    const SignState state = from_state ? sign_state(problem, saved) : SignState{};
    const at::Tensor gp = grad_pos.to(at::kDouble).contiguous(), gn = grad_neg.to(at::kDouble).contiguous();
    GradientOutputs closed = outputs;
    if (problem.distance == Distance::L1) closed.teacher = FeatureRows{};
    at::parallel_for(0, problem.blocks, 1, [&](int64_t begin, int64_t end) {
      kernels->in_batch_gradients(problem, gp.data_ptr<double>(), gn.data_ptr<double>(), state, closed, begin, end);
    });
    if (problem.distance == Distance::L2 || !output_mask[1]) return {grad_student, grad_teacher, grad_negatives};
    outputs.student = FeatureRows{};
  }

  // dL/d(pair sum): d_pos = sum / N, d_neg = mean over the negatives of sum / N.
  // l2's psi'(d) = 2 d: the kernels use d and get the 2 here.
  const at::Tensor gp = grad_pos.to(at::kDouble).contiguous(), gn = grad_neg.to(at::kDouble).contiguous();
  const double* pos = gp.data_ptr<double>();
  const double* neg = gn.data_ptr<double>();
  const double scale = (problem.distance == Distance::L2 ? 2.0 : 1.0) /
                       static_cast<double>(problem.channels * problem.height * problem.width);
  std::vector<double> weights(problem.pairs());
  for (int64_t i = 0; i < batch; ++i) {
    const double negative_weight = neg[i] / static_cast<double>(problem.in_batch() ? batch - 1 : targets - 1);
    for (int64_t k = 0; k < targets; ++k) {
      const bool positive = problem.in_batch() ? k == i : k == 0;
      weights[i * targets + k] = (positive ? pos[i] : negative_weight) * scale;
    }
  }
  at::parallel_for(0, problem.blocks, 1, [&](int64_t begin, int64_t end) {
    kernels->distance_gradients(problem, weights.data(), outputs, begin, end);
  });
  return {grad_student, grad_teacher, grad_negatives};
}

// (B, 2): per-patch mean squared error of sr_student and sr_teacher against hr,
// in float32 (float64 for float64 hr). One pass: hr is pair (b, 0) of group b
// in the kernels' explicit-negatives layout, with the two outputs as targets.
at::Tensor patch_mse(const at::Tensor& sr_student, const at::Tensor& sr_teacher, const at::Tensor& hr) {
  DistanceProblem problem;
  problem.student = feature_rows(hr, "hr");
  problem.teacher = feature_rows(sr_student, "sr_student");
  problem.negatives = feature_rows(sr_teacher, "sr_teacher");
  for (const auto& [x, name] : {std::pair{&sr_student, "sr_student"}, std::pair{&sr_teacher, "sr_teacher"}})
    TORCH_CHECK(x->sizes() == hr.sizes(), name, " must have hr's shape ", hr.sizes(), ", got ", x->sizes());
  TORCH_CHECK(hr.numel() > 0, "hr must not be empty, got shape ", hr.sizes());
  problem.batch = hr.size(0);
  problem.channels = hr.size(1);
  problem.height = hr.size(2);
  problem.width = hr.size(3);
  problem.negatives_per_patch = 1;
  problem.distance = Distance::L2;
  problem.normalize = false;
  // Read each image in its own dtype, accumulate as the reference does: in compute_dtype(hr).
  problem.compute_in_double = hr.scalar_type() == at::kDouble;
  set_tiling(problem);
  const std::vector<double> sums = pair_sums(problem);
  const double elements = static_cast<double>(problem.channels * problem.height * problem.width);
  std::vector<double> mse(sums.size());
  for (size_t i = 0; i < sums.size(); ++i) mse[i] = sums[i] / elements;
  return tensor_of(mse, {problem.batch, 2}, hr.options().dtype(compute_type(hr.scalar_type())));
}

std::string cpu_capability() { return active_kernels()->name; }

// "auto" (the best this CPU runs), "default", "avx2" or "avx512"; for tests and benchmarks.
void set_cpu_capability(c10::string_view requested) {
  const std::string name(requested);
  if (name == "auto") {
    forced_kernels.store(nullptr);
    return;
  }
  const KernelTable* kernels = kernels_named(name);
  TORCH_CHECK(kernels != nullptr, "cpu capability must be 'auto', 'default', 'avx2' or 'avx512' (compiled in), got '",
              name, "'");
  TORCH_CHECK(cpu_supports(name.c_str()), "this CPU cannot run the ", name, " kernels");
  forced_kernels.store(kernels);
}

}  // namespace facd

TORCH_LIBRARY_IMPL(facd_fast, CPU, m) {
  m.impl("feature_distances", &facd::feature_distances);
  m.impl("feature_distances_backward", &facd::feature_distances_backward);
  m.impl("patch_mse", &facd::patch_mse);
}

// No tensor arguments, so no device to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(facd_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_capability", &facd::cpu_capability);
  m.impl("set_cpu_capability", &facd::set_cpu_capability);
}
