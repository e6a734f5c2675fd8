// The facd_fast ops: their schemas, declared here once for every device.
//
// Kernels are registered per dispatch key elsewhere: the CPU kernels in
// facd_cpu.cpp (TORCH_LIBRARY_IMPL(facd_fast, CPU, m)), the CUDA kernels from
// kernels/ (Triton) in facd_fast/ops.py, which also registers the fake
// (meta) kernels and the autograd formula. docs/architecture.md has the map.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(facd_fast, m) {
  // d_pos, d_neg: (B,) in float32 (float64 for float64 inputs), see
  // facd_fast.reference.feature_distances. saved: what the kernel keeps for
  // its backward, kernel-defined (an empty tensor when it keeps nothing);
  // keep_state: the student's gradient will be asked for, so keep what makes
  // its backward cheap (l1 with in-batch negatives: the per-element sign sums).
  m.def(
      "feature_distances(Tensor student, Tensor teacher, Tensor? negatives, str distance, str normalize, "
      "bool keep_state=False) -> (Tensor d_pos, Tensor d_neg, Tensor saved)");
  // Gradients of sum(grad_pos * d_pos + grad_neg * d_neg) w.r.t. student,
  // teacher, negatives, each shaped and typed like its input where
  // output_mask asks for it, an empty tensor where not.
  m.def(
      "feature_distances_backward(Tensor grad_pos, Tensor grad_neg, Tensor student, Tensor teacher, "
      "Tensor? negatives, Tensor saved, str distance, str normalize, bool[3] output_mask) "
      "-> (Tensor grad_student, Tensor grad_teacher, Tensor grad_negatives)");
  // (B, 2) in float32 (float64 for float64 hr): per-patch MSE of sr_student
  // and of sr_teacher against hr. No gradient.
  m.def("patch_mse(Tensor sr_student, Tensor sr_teacher, Tensor hr) -> Tensor");
  // The instruction set the CPU kernels run with ("default", "avx2",
  // "avx512"), and forcing one ("auto" returns to the best); tests and benchmarks.
  m.def("cpu_capability() -> str");
  m.def("set_cpu_capability(str name) -> ()");
}

// `import facd_fast._C` loads this library, which runs the registrations
// above; the module itself is empty (pytorch/extension-cpp's pattern).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
