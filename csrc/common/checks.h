// Argument checks shared by the operator families' host code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace visionmoe {

// Every tensor argument of an operator must be on one device: the dispatcher picks the kernel from all of them
// together, so a tensor on another device (a meta tensor beside CPU ones, say) would otherwise reach a kernel
// that reads its memory as if it were on the kernel's device.
inline void check_device(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                         const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), " like ", like_name,
                    ", got ", t.device());
}

}  // namespace visionmoe
