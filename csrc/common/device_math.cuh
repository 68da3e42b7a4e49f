// Elementwise math of the CUDA kernels in their opmath type (float for float16, bfloat16 and float32; double for
// float64), one overload per type, so that templated kernels call the single- or double-precision function.
#pragma once

#include <limits>

namespace visionmoe::device_math {

__device__ __forceinline__ float exp_opmath(float x) { return expf(x); }
__device__ __forceinline__ double exp_opmath(double x) { return exp(x); }
__device__ __forceinline__ float log_opmath(float x) { return logf(x); }
__device__ __forceinline__ double log_opmath(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T negative_infinity() {
  return -std::numeric_limits<T>::infinity();
}

}  // namespace visionmoe::device_math
