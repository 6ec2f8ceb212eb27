// The one definition of each activation and its derivative, shared by the CPU kernels, the CUDA
// kernels and the host-execution harness.
//
// The formulas are written once against a small "math policy" M that supplies the three
// primitives they need (relu, step, exp). ScalarMath below serves scalars on host and device; the
// CPU kernels plug in a policy for at::vec::Vectorized so the same formula runs SIMD-wide.
// Everything is computed in the accumulation type (float for 16-bit inputs).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FB_HOST_DEVICE inline
#endif

namespace fused_backprop {

enum class Activation : int { ReLU = 0, Sigmoid = 1 };

struct ScalarMath {
  // relu(NaN) = NaN like torch.relu: the comparison is false for NaN, so z passes through.
  template <typename T>
  static FB_HOST_DEVICE T relu(T z) { return z < T(0) ? T(0) : z; }
  // 0 where v <= 0, else 1: relu'(0) = 0, and NaN lets the gradient through, as torch's
  // threshold_backward does.
  template <typename T>
  static FB_HOST_DEVICE T step(T v) { return v <= T(0) ? T(0) : T(1); }
  template <typename T>
  static FB_HOST_DEVICE T exp(T v) {
    using std::exp;
    return exp(v);
  }
};

template <Activation A>
struct Act;

template <>
struct Act<Activation::ReLU> {
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z) { return M::relu(z); }
  // From the output y = relu(z): y <= 0 exactly when z <= 0.
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_output(T y) { return M::step(y); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z) { return M::step(z); }
};

template <>
struct Act<Activation::Sigmoid> {
  // 1 / (1 + e^-z) is stable at both ends: e^-z overflows to inf for z << 0, giving exactly 0,
  // and underflows to 0 for z >> 0, giving exactly 1; no inf/inf is ever formed.
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z) { return T(1) / (T(1) + M::exp(T(0) - z)); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_output(T y) { return y * (T(1) - y); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z) {
    return grad_from_output<T, M>(forward<T, M>(z));
  }
};

// Calls f.template operator()<Activation::X>() for the runtime activation.
template <typename F>
decltype(auto) dispatch_activation(Activation act, F&& f) {
  if (act == Activation::ReLU) {
    return f.template operator()<Activation::ReLU>();
  }
  return f.template operator()<Activation::Sigmoid>();
}

}  // namespace fused_backprop
