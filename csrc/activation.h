// The one definition of each activation and its first and second derivatives, shared by the CPU
// kernels, the CUDA kernels and the host-execution harness. The list itself is activations.def.
//
// The formulas are written once against a small "math policy" M that supplies the primitives
// they need (relu, step, where_positive, exp, tanh, erf). ScalarMath below serves scalars on host
// and device; the CPU kernels plug in a policy for at::vec::Vectorized so the same formula runs
// SIMD-wide. Everything is computed in the accumulation type (float for 16-bit inputs). Each
// formula is written in the order of operations torch's own kernel uses (ATen's Activation.cpp,
// GeluKernel.cpp), so that with the same primitives the results match torch's bit for bit.
//
// Every function takes `a`, the activation's parameter: leaky relu's negative slope (the others
// ignore it), so one signature serves every activation.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FB_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Inlined into the CPU kernels' row loops as on the device: a call per vector (the formulas,
// then the math they call) cost as much as the math at the DEFAULT level.
#define FB_HOST_DEVICE __attribute__((always_inline)) inline
#endif

namespace fused_backprop {

enum class Activation : int {
#define FB_ACTIVATION(E, name, saved, sign) E,
#include "activations.def"
#undef FB_ACTIVATION
};

// What linear_act_bwd's `out` holds for an activation (activations.def's `saved` column).
enum class Saved : int { Output, Preact };

struct ScalarMath {
  // relu(NaN) = NaN like torch.relu: the comparison is false for NaN, so z passes through.
  template <typename T>
  static FB_HOST_DEVICE T relu(T z) { return z < T(0) ? T(0) : z; }
  // 0 where v <= 0, else 1: relu'(0) = 0, and NaN lets the gradient through, as torch's
  // threshold_backward does.
  template <typename T>
  static FB_HOST_DEVICE T step(T v) { return v <= T(0) ? T(0) : T(1); }
  // p where v > 0, else q (NaN: q), as torch's leaky_relu and its backward select.
  template <typename T>
  static FB_HOST_DEVICE T where_positive(T v, T p, T q) { return v > T(0) ? p : q; }
  template <typename T>
  static FB_HOST_DEVICE T exp(T v) {
    using std::exp;
    return exp(v);
  }
  template <typename T>
  static FB_HOST_DEVICE T tanh(T v) {
    using std::tanh;
    return tanh(v);
  }
  template <typename T>
  static FB_HOST_DEVICE T erf(T v) {
    using std::erf;
    return erf(v);
  }
};

// Act<A>: forward(z), grad_from_preact(z) = act'(z), grad2_from_preact(z) = act''(z), and for the
// activations whose `saved` is Output, grad_from_output(y) and grad2_from_output(y): act'(z) and
// act''(z) written with y = act(z).
// The sign activations also give mask_bit(y), the bit their packed mask keeps (kMaskBitOfNaN: the
// bit a NaN gets), and masked_off_dz(g, a), dz where that bit is clear (dz = g where it is set).
template <Activation A>
struct Act;

template <>
struct Act<Activation::ReLU> {
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z, T) { return M::relu(z); }
  // From the output y = relu(z): y <= 0 exactly when z <= 0.
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_output(T y, T) { return M::step(y); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z, T) { return M::step(z); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_preact(T, T) { return T(0); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_output(T, T) { return T(0); }
  template <typename T>
  static FB_HOST_DEVICE bool mask_bit(T y) { return !(y <= T(0)); }
  static constexpr bool kMaskBitOfNaN = true;
  // Where the bit is clear, dz = 0 (also for a NaN grad_out, as threshold_backward).
  template <typename T>
  static FB_HOST_DEVICE T masked_off_dz(T, T) { return T(0); }
};

template <>
struct Act<Activation::LeakyReLU> {
  // z where z > 0, else a z (NaN stays NaN); its derivative 1 or a, a at 0 and at NaN, as torch.
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z, T a) { return M::where_positive(z, z, z * a); }
  // y > 0 exactly when z > 0 for a >= 0; for a < 0 backward is given z instead (the same formula).
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_output(T y, T a) { return M::where_positive(y, T(1), a); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z, T a) { return M::where_positive(z, T(1), a); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_preact(T, T) { return T(0); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_output(T, T) { return T(0); }
  template <typename T>
  static FB_HOST_DEVICE bool mask_bit(T y) { return y > T(0); }
  static constexpr bool kMaskBitOfNaN = false;
  template <typename T>
  static FB_HOST_DEVICE T masked_off_dz(T g, T a) { return g * a; }
};

template <>
struct Act<Activation::Sigmoid> {
  // 1 / (1 + e^-z) is stable at both ends: e^-z overflows to inf for z << 0, giving exactly 0,
  // and underflows to 0 for z >> 0, giving exactly 1; no inf/inf is ever formed.
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z, T) { return T(1) / (T(1) + M::exp(T(0) - z)); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_output(T y, T) { return y * (T(1) - y); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z, T a) {
    return grad_from_output<T, M>(forward<T, M>(z, a), a);
  }
  // σ'' = σ (1 - σ) (1 - 2σ).
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_output(T y, T) { return y * (T(1) - y) * (T(1) - T(2) * y); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_preact(T z, T a) { return grad2_from_output<T, M>(forward<T, M>(z, a), a); }
};

template <>
struct Act<Activation::Tanh> {
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z, T) { return M::tanh(z); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_output(T y, T) { return T(1) - y * y; }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z, T a) { return grad_from_output<T, M>(M::tanh(z), a); }
  // tanh'' = -2 t (1 - t²).
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_output(T y, T) { return T(-2) * y * (T(1) - y * y); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_preact(T z, T a) { return grad2_from_output<T, M>(M::tanh(z), a); }
};

// gelu(z) = z Φ(z) = z/2 (1 + erf(z/√2)); gelu' = Φ(z) + z φ(z); gelu'' = φ(z) (2 - z²), with
// φ(z) = e^(-z²/2) / √(2π).
template <>
struct Act<Activation::GELU> {
  static constexpr double kSqrtHalf = 0.70710678118654752440;     // M_SQRT1_2
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // M_2_SQRTPI * M_SQRT1_2 * 0.5
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z, T) { return z * T(0.5) * (T(1) + M::erf(z * T(kSqrtHalf))); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z, T) {
    const T cdf = T(0.5) * (T(1) + M::erf(z * T(kSqrtHalf)));
    const T pdf = T(kInvSqrt2Pi) * M::exp(z * z * T(-0.5));
    return cdf + z * pdf;
  }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_preact(T z, T) {
    return T(kInvSqrt2Pi) * M::exp(z * z * T(-0.5)) * (T(2) - z * z);
  }
};

// gelu_tanh(z) = z/2 (1 + tanh(u)), u = β (z + κ z³), β = √(2/π), κ = 0.044715 (F.gelu with
// approximate="tanh"). With t = tanh(u), u' = β (1 + 3κ z²), u'' = 6βκ z:
// gelu_tanh' = (1 + t)/2 + z/2 (1 - t²) u';  gelu_tanh'' = (1 - t²) (u' + z/2 (u'' - 2 t u'²)).
template <>
struct Act<Activation::GELUTanh> {
  static constexpr double kBeta = 0.79788456080286535588;  // M_SQRT2 * M_2_SQRTPI * 0.5
  static constexpr double kKappa = 0.044715;
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z, T) {
    const T inner = T(kBeta) * (z + T(kKappa) * (z * z * z));
    return T(0.5) * z * (T(1) + M::tanh(inner));
  }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z, T) {
    const T z_sq = z * z;
    const T t = M::tanh(T(kBeta) * (z + T(kKappa) * (z_sq * z)));
    const T left = T(0.5) * z, right = T(1) + t;
    const T du = T(kBeta) * (T(1) + T(3 * kKappa) * z_sq);
    return T(0.5) * right + left * (T(1) - t * t) * du;
  }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_preact(T z, T) {
    const T z_sq = z * z;
    const T t = M::tanh(T(kBeta) * (z + T(kKappa) * (z_sq * z)));
    const T du = T(kBeta) * (T(1) + T(3 * kKappa) * z_sq), d2u = T(6 * kBeta * kKappa) * z;
    return (T(1) - t * t) * (du + T(0.5) * z * (d2u - T(2) * t * du * du));
  }
};

// silu(z) = z σ(z); silu' = σ (1 + z (1 - σ)); silu'' = σ (1 - σ) (2 + z (1 - 2σ)).
template <>
struct Act<Activation::SiLU> {
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T forward(T z, T) { return z / (T(1) + M::exp(T(0) - z)); }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad_from_preact(T z, T) {
    const T s = T(1) / (T(1) + M::exp(T(0) - z));
    return s * (T(1) + z * (T(1) - s));
  }
  template <typename T, typename M = ScalarMath>
  static FB_HOST_DEVICE T grad2_from_preact(T z, T) {
    const T s = T(1) / (T(1) + M::exp(T(0) - z));
    return s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s));
  }
};

// activations.def's columns as compile-time traits.
template <Activation A>
constexpr Saved kSaved = Saved::Output;
template <Activation A>
constexpr bool kSignDecides = false;
#define FB_ACTIVATION(E, name, saved, sign)                       \
  template <>                                                    \
  inline constexpr Saved kSaved<Activation::E> = Saved::saved;   \
  template <>                                                    \
  inline constexpr bool kSignDecides<Activation::E> = sign;
#include "activations.def"
#undef FB_ACTIVATION

// act'(z) from what backward was given in `out`: the output y or the pre-activation z, per kSaved.
template <Activation A, typename T, typename M = ScalarMath>
FB_HOST_DEVICE T grad_from_saved(T v, T a) {
  if constexpr (kSaved<A> == Saved::Output) {
    return Act<A>::template grad_from_output<T, M>(v, a);
  } else {
    return Act<A>::template grad_from_preact<T, M>(v, a);
  }
}

// act''(z) from what backward was given in `out`, as grad_from_saved.
template <Activation A, typename T, typename M = ScalarMath>
FB_HOST_DEVICE T grad2_from_saved(T v, T a) {
  if constexpr (kSaved<A> == Saved::Output) {
    return Act<A>::template grad2_from_output<T, M>(v, a);
  } else {
    return Act<A>::template grad2_from_preact<T, M>(v, a);
  }
}

// activations.def's rows at run time, indexed by the enum.
struct ActivationInfo {
  const char* name;
  Saved saved;
  bool sign_decides;
};
inline constexpr ActivationInfo kActivations[] = {
#define FB_ACTIVATION(E, name, saved, sign) {name, Saved::saved, sign},
#include "activations.def"
#undef FB_ACTIVATION
};
inline constexpr int kNumActivations = sizeof(kActivations) / sizeof(kActivations[0]);
inline const ActivationInfo& info(Activation act) { return kActivations[static_cast<int>(act)]; }

// Calls f.template operator()<Activation::X>() for the runtime activation: an exhaustive switch,
// so a new entry in activations.def is instantiated everywhere this is used.
template <typename F>
decltype(auto) dispatch_activation(Activation act, F&& f) {
  switch (act) {
#define FB_ACTIVATION(E, name, saved, sign) \
  case Activation::E:                       \
    return f.template operator()<Activation::E>();
#include "activations.def"
#undef FB_ACTIVATION
  }
  return f.template operator()<Activation::ReLU>();  // unreachable: parse_activation checked act
}

}  // namespace fused_backprop
