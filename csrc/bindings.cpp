// The Python module visionmoe._C: build facts and helpers that are not tensor operators. Loading it also
// registers every operator (registration.cpp and the kernel files are linked into it).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::string(VISIONMOE_TORCH_VERSION);
#ifdef VISIONMOE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::string(VISIONMOE_CUDA_VERSION);
  info["cuda_archs"] = std::string(VISIONMOE_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  info["openmp"] = AT_PARALLEL_OPENMP == 1;
  info["num_threads"] = at::get_num_threads();
  info["compiler"] = std::string(VISIONMOE_COMPILER);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "visionmoe's compiled extension: operators are under torch.ops.visionmoe";
  m.def("build_info", &build_info, "Facts about this build of visionmoe: torch and CUDA versions, archs, threads.");
}
