// CUDA registration of the Soft MoE family. Its operator bodies are ATen (soft_moe.cpp explains why no
// hand-written kernel), so this file only registers them for the CUDA backend; being a .cu file, it is compiled
// in CUDA builds only, like the other families' CUDA registrations.
#include <torch/library.h>

#include "soft_moe/soft_moe.h"

namespace visionmoe::soft_moe {

TORCH_LIBRARY_IMPL(visionmoe, CUDA, m) { impl_kernels(m); }

}  // namespace visionmoe::soft_moe
