// Warp-level reductions of the CUDA kernels: a butterfly of shuffles, after which lane 0's result is broadcast,
// so that every lane holds the bitwise same value (lanes' butterflies may add in different orders).
#pragma once

namespace visionmoe::warp_reduce {

constexpr int kWarpSize = 32;

// The warp's sum, as lane 0 computed it, in every lane.
template <typename T>
__device__ __forceinline__ T warp_sum(T partial) {
#pragma unroll
  for (int shift = kWarpSize / 2; shift > 0; shift /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, shift);
  return __shfl_sync(0xffffffffu, partial, 0);
}

// The warp's maximum, in every lane; NaN in any lane may or may not propagate, as with fmax.
template <typename T>
__device__ __forceinline__ T warp_max(T partial) {
#pragma unroll
  for (int shift = kWarpSize / 2; shift > 0; shift /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, partial, shift);
    partial = other > partial ? other : partial;
  }
  return __shfl_sync(0xffffffffu, partial, 0);
}

}  // namespace visionmoe::warp_reduce
