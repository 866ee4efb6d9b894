// The Python module vlmo_fast._C. Ops live in the `vlmo_fast` torch library namespace
// (torch.ops.vlmo_fast.*), each registered by its own csrc/ file with TORCH_LIBRARY_FRAGMENT;
// importing this module is what runs those registrations. Keep this the only PYBIND11_MODULE
// in csrc/: one extension can define the module entry point once.
#include <torch/extension.h>

#include "hard_negatives_vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vlmo_fast compiled ops; call them through torch.ops.vlmo_fast";
#if defined(VLMO_FAST_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_vector_path", &vlmo_fast::hardneg::cpu_vector_path,
        "which vectorised CPU sampler primitives run here: 'avx2' or 'portable'");
}
