// Host side of the fused FACD CPU kernels: tensor checks, tiling, the parallel
// loop over tiles, the fixed-order reduction of the per-tile sums, and the
// Python bindings (facd_fast._C). The kernels themselves are in facd_kernels.h.
//
// This translation unit also compiles the DEFAULT (no ISA flags) instance of
// the kernels, and it comes first in the link (setup.py and the JIT loader
// pass csrc/*.cpp sorted): where an inline function from a shared header is
// compiled both here and in an AVX2/AVX-512 unit, the linker keeps this,
// portable, copy.
#define CPU_CAPABILITY DEFAULT
#include "facd_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>

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

void check_output(const at::Tensor& out, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_cpu(out, name);
  TORCH_CHECK(out.sizes() == shape, name, " must have shape ", shape, ", got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, name, " must be ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, name, " must not have overlapping elements");
}

void write_values(at::Tensor& out, std::vector<double> values, at::IntArrayRef shape) {
  out.copy_(at::from_blob(values.data(), shape, at::kDouble));
}

}  // namespace

// d_pos, d_neg (B,) in float32 (float64 for float64 inputs); see reference.feature_distances.
void feature_distances_out(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& negatives, const std::string& distance,
                           const std::string& normalize, at::Tensor d_pos, at::Tensor d_neg) {
  DistanceProblem problem = distance_problem(student, teacher, negatives, distance, normalize);
  const at::ScalarType dtype = compute_type(student.scalar_type());
  check_output(d_pos, "d_pos", {problem.batch}, dtype);
  check_output(d_neg, "d_neg", {problem.batch}, dtype);
  const std::vector<double> sums = pair_sums(problem);
  const double elements = static_cast<double>(problem.channels * problem.height * problem.width);
  const int64_t batch = problem.batch;
  std::vector<double> pos(batch), neg(batch);
  for (int64_t i = 0; i < batch; ++i) {
    double negative_total = 0.0;
    if (problem.in_batch()) {
      for (int64_t k = 0; k < batch; ++k)
        if (k != i) negative_total += sums[i * batch + k];
      pos[i] = sums[i * batch + i] / elements;
      neg[i] = negative_total / static_cast<double>(batch - 1) / elements;
    } else {
      const int64_t targets = problem.group_targets();
      for (int64_t k = 1; k < targets; ++k) negative_total += sums[i * targets + k];
      pos[i] = sums[i * targets] / elements;
      neg[i] = negative_total / static_cast<double>(targets - 1) / elements;
    }
  }
  write_values(d_pos, pos, {batch});
  write_values(d_neg, neg, {batch});
}

// Gradients of sum_i grad_pos[i] d_pos[i] + grad_neg[i] d_neg[i] into the
// given outputs (None: not needed), each shaped and typed like its input.
void feature_distances_backward_out(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                    const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& negatives, const std::string& distance,
                                    const std::string& normalize, std::optional<at::Tensor> grad_student,
                                    std::optional<at::Tensor> grad_teacher,
                                    std::optional<at::Tensor> grad_negatives) {
  DistanceProblem problem = distance_problem(student, teacher, negatives, distance, normalize);
  const int64_t batch = problem.batch, targets = problem.group_targets();
  for (const auto& [grad, name] : {std::pair{&grad_pos, "grad_pos"}, std::pair{&grad_neg, "grad_neg"}}) {
    check_cpu(*grad, name);
    TORCH_CHECK(grad->sizes() == at::IntArrayRef{batch}, name, " must have shape (", batch, ",), got ",
                grad->sizes());
  }
  TORCH_CHECK(!grad_negatives.has_value() || negatives.has_value(),
              "grad_negatives needs explicit negatives; in-batch negatives are the teacher");
  GradientOutputs outputs;
  if (grad_student.has_value()) {
    check_output(*grad_student, "grad_student", student.sizes(), student.scalar_type());
    outputs.student = feature_rows(*grad_student, "grad_student");
  }
  if (grad_teacher.has_value()) {
    check_output(*grad_teacher, "grad_teacher", teacher.sizes(), teacher.scalar_type());
    outputs.teacher = feature_rows(*grad_teacher, "grad_teacher");
  }
  if (grad_negatives.has_value()) {
    check_output(*grad_negatives, "grad_negatives", negatives->sizes(), negatives->scalar_type());
    outputs.negatives = negative_rows(*grad_negatives, "grad_negatives");
  }
  if (outputs.student.data == nullptr && outputs.teacher.data == nullptr && outputs.negatives.data == nullptr)
    return;

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
  const KernelTable* kernels = active_kernels();
  at::parallel_for(0, problem.blocks, 1, [&](int64_t begin, int64_t end) {
    kernels->distance_gradients(problem, weights.data(), outputs, begin, end);
  });
}

// (B, 2): per-patch mean squared error of sr_student and sr_teacher against hr,
// in float32 (float64 for float64 hr). One pass: hr is pair (b, 0) of group b
// in the kernels' explicit-negatives layout, with the two outputs as targets.
void patch_mse_out(const at::Tensor& sr_student, const at::Tensor& sr_teacher, const at::Tensor& hr,
                   at::Tensor out) {
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
  check_output(out, "out", {problem.batch, 2}, compute_type(hr.scalar_type()));
  const std::vector<double> sums = pair_sums(problem);
  const double elements = static_cast<double>(problem.channels * problem.height * problem.width);
  std::vector<double> mse(sums.size());
  for (size_t i = 0; i < sums.size(); ++i) mse[i] = sums[i] / elements;
  write_values(out, mse, {problem.batch, 2});
}

std::string cpu_capability() { return active_kernels()->name; }

// "auto" (the best this CPU runs), "default", "avx2" or "avx512"; for tests and benchmarks.
void set_cpu_capability(const std::string& name) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused FACD CPU kernels (see csrc/facd_kernels.h)";
  m.def("feature_distances_out", &facd::feature_distances_out, "d_pos, d_neg of the FACD loss into the given (B,) outputs",
        py::arg("student"), py::arg("teacher"), py::arg("negatives"), py::arg("distance"), py::arg("normalize"),
        py::arg("d_pos"), py::arg("d_neg"));
  m.def("feature_distances_backward_out", &facd::feature_distances_backward_out,
        "gradients of the FACD distances into the given outputs (None: not needed)", py::arg("grad_pos"),
        py::arg("grad_neg"), py::arg("student"), py::arg("teacher"), py::arg("negatives"), py::arg("distance"),
        py::arg("normalize"), py::arg("grad_student"), py::arg("grad_teacher"), py::arg("grad_negatives"));
  m.def("patch_mse_out", &facd::patch_mse_out, "per-patch MSE of sr_student and sr_teacher against hr into (B, 2)",
        py::arg("sr_student"), py::arg("sr_teacher"), py::arg("hr"), py::arg("out"));
  m.def("cpu_capability", &facd::cpu_capability, "the instruction set the kernels run with");
  m.def("set_cpu_capability", &facd::set_cpu_capability, "force 'default', 'avx2' or 'avx512', or 'auto'",
        py::arg("name"));
}
