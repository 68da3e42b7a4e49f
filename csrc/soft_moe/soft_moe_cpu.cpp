// CPU registration of the Soft MoE family. Its operator bodies are ATen (soft_moe.cpp explains why no
// hand-written kernel), so this file only registers them for the CPU backend, as each backend's file does.
#include <torch/library.h>

#include "soft_moe/soft_moe.h"

namespace visionmoe::soft_moe {

TORCH_LIBRARY_IMPL(visionmoe, CPU, m) { impl_kernels(m); }

}  // namespace visionmoe::soft_moe
