// Math helpers of the CPU kernels, written so that the loops calling them vectorise with the compiler's
// baseline instruction set (no library calls, no branches, no reordering of any one partial sum), which keeps
// the kernels fast and deterministic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Marks a kernel's row loops to be compiled three times, for AVX-512 (with FMA), for AVX2 and for the x86-64
// baseline, the loader picking the best that the CPU supports (an ifunc); the build itself targets the baseline
// only. The helpers below are always inlined, so that each clone runs them in its own vector width (GCC does not
// inline across a change of -march, hence ISA extensions rather than arch= clones). Each machine runs one clone,
// so results stay deterministic there; other machines may round differently (FMA contraction). GCC on x86-64
// Linux only (Clang does not clone function templates); elsewhere a no-op.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VISIONMOE_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VISIONMOE_CPU_CLONES
#endif

#if defined(__GNUC__)
#define VISIONMOE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define VISIONMOE_ALWAYS_INLINE inline
#endif

namespace visionmoe::vectorized_math {

// Independent partial results of a sum or maximum over a row: the compiler vectorises such loops without
// reordering any one partial sum, so results stay deterministic.
constexpr int64_t kLanes = 16;

// e^x for float without library calls or branches, so that loops calling it vectorise (std::exp does not, and
// neither does a select, which the compiler turns back into a branch): e^x = 2^n e^r with n = round(x / ln 2),
// |r| <= ln(2) / 2, and e^r by its Taylor polynomial of degree 7, whose truncation error (below 6e-9) is a tenth
// of float's epsilon; the result is within 2 ulp of e^x. Below -88 (e^x < 2^-126.9) the result is 0, and so it
// is for -inf; NaN propagates. Arguments above 88 are outside its range: the kernels only exponentiate
// differences to a maximum or log-softmax values, which are <= 0 up to rounding.
VISIONMOE_ALWAYS_INLINE float exp_opmath(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  // ln 2 = kLn2High + kLn2Low, with kLn2High short enough that n * kLn2High is exact.
  constexpr float kLn2High = 0.693359375f;
  constexpr float kLn2Low = -2.12194440e-4f;
  // 1.5 * 2^23: adding it rounds x / ln 2 to an integer n, which the float's low mantissa bits then hold as
  // kRoundToIntegerBits + n.
  constexpr float kRoundToInteger = 12582912.0f;
  constexpr uint32_t kRoundToIntegerBits = 0x4B400000u;
  constexpr float kMinArgument = -88.0f;
  const float shifted_n = x * kLog2e + kRoundToInteger;
  const float n = shifted_n - kRoundToInteger;
  const float r = (x - n * kLn2High) - n * kLn2Low;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  // 2^n is the float with biased exponent n + 127 and a zero mantissa (0 for n = -127). Unsigned arithmetic:
  // for x < -88 the bits are meaningless, and masked below.
  uint32_t shifted_n_bits;
  std::memcpy(&shifted_n_bits, &shifted_n, sizeof(shifted_n_bits));
  const uint32_t two_to_n_bits = (shifted_n_bits - kRoundToIntegerBits + 127u) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &two_to_n_bits, sizeof(two_to_n));
  const float value = poly * two_to_n;
  uint32_t value_bits;
  std::memcpy(&value_bits, &value, sizeof(value_bits));
  value_bits &= -static_cast<uint32_t>(!(x < kMinArgument));  // all ones, or zero where e^x underflows
  float result;
  std::memcpy(&result, &value_bits, sizeof(result));
  return result;
}

VISIONMOE_ALWAYS_INLINE double exp_opmath(double x) { return std::exp(x); }

// log(x) for float without library calls or branches, so that loops calling it vectorise: x = 2^k m with
// m in [sqrt(1/2), sqrt(2)), read off the float's bits, and log(m) = 2 atanh(s) = 2 (s + s^3/3 + ... + s^9/9)
// with s = (m - 1) / (m + 1), |s| <= 0.172, whose truncation error (below 3e-9 relative) is far below float's
// epsilon; the result is within 3 ulp of log(x) for normal x > 0 (2.7 at most over a sweep of all exponents).
// Zero, subnormal, negative, infinite and NaN arguments give a finite, meaningless value: callers multiply the
// result by x (0 log 0 = 0 then comes out exact, and inf or NaN arguments still make the product non-finite) or
// check such arguments themselves.
VISIONMOE_ALWAYS_INLINE float log_opmath(float x) {
  constexpr float kLn2High = 0.693359375f;
  constexpr float kLn2Low = -2.12194440e-4f;
  constexpr uint32_t kSqrtHalfBits = 0x3F3504F3u;  // the bits of sqrt(1/2)
  constexpr uint32_t kMantissaMask = 0x007FFFFFu;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  // Counting from sqrt(1/2)'s bits, the exponent field holds k and the low bits the position of m in its octave.
  const uint32_t offset = bits - kSqrtHalfBits;
  const float k = static_cast<float>(static_cast<int32_t>(offset) >> 23);
  const uint32_t mantissa_bits = (offset & kMantissaMask) + kSqrtHalfBits;
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof(m));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float poly = 1.0f / 9.0f;
  poly = poly * s2 + 1.0f / 7.0f;
  poly = poly * s2 + 1.0f / 5.0f;
  poly = poly * s2 + 1.0f / 3.0f;
  poly = poly * s2 + 1.0f;
  return (k * kLn2Low + 2.0f * s * poly) + k * kLn2High;
}

// The same contract in double, where speed matters less: zero, negative and NaN arguments give 0.
VISIONMOE_ALWAYS_INLINE double log_opmath(double x) { return std::log(x > 0 ? x : 1.0); }

template <typename acc_t, typename T>
VISIONMOE_ALWAYS_INLINE acc_t sum_of(const T* x, int64_t n) {
  acc_t partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) partial[l] += static_cast<acc_t>(x[i + l]);
  }
  for (; i < n; ++i) partial[i % kLanes] += static_cast<acc_t>(x[i]);
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += partial[l];
  return total;
}

template <typename T>
VISIONMOE_ALWAYS_INLINE T max_of(const T* x, int64_t n) {
  T partial[kLanes];
  std::fill(partial, partial + kLanes, -std::numeric_limits<T>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) partial[l] = x[i + l] > partial[l] ? x[i + l] : partial[l];
  }
  for (; i < n; ++i) partial[i % kLanes] = x[i] > partial[i % kLanes] ? x[i] : partial[i % kLanes];
  return *std::max_element(partial, partial + kLanes);
}

}  // namespace visionmoe::vectorized_math
