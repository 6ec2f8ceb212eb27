// Row-wise elementwise passes of the CPU kernels, SIMD-wide through at::vec.
//
// map_row(n, f, out, in...) runs out[j] = f(in[j]...) over one contiguous row. For float and
// double f sees at::vec::Vectorized values and the VecMath policy; for 16-bit types it sees
// floats and ScalarMath. f is a generic lambda `[]<typename M, typename V>(V a, ...)`, so the
// activation formulas of activation.h are written once and run both ways.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "activation.h"

namespace fused_backprop::cpu {

// e^v, SIMD-wide. ATen's Vectorized::exp (Sleef, 1 ULP) in general; for AVX-512 float, a
// shorter sequence with the same accuracy: Cody-Waite reduction v = n ln2 + r, Cephes expf's
// degree-7 polynomial for e^r, and vscalefps for 2^n, which gives inf, denormals and 0 at the
// ends without special cases. Max error 1.0 ULP over every 16th float in [-104, 89] (Sleef:
// 0.57); sigmoid built on it is within 1.43e-7 relative of float64, as torch.sigmoid is. It
// takes 0.24 ns per sigmoid element against Sleef's 0.33 (one core, 64K floats in L2), which
// is most of what sigmoid costs over relu after the GEMM.
template <typename V>
inline V vec_exp(V v) {
  return v.exp();
}

#if defined(CPU_CAPABILITY_AVX512)
inline at::vec::Vectorized<float> vec_exp(at::vec::Vectorized<float> v) {
  // Clamp to where e^v is 0 / inf anyway; vmaxps/vminps return their second operand (v) for NaN.
  __m512 x = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-104.f), v));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

struct VecMath {
  // at::vec::maximum propagates NaN, like torch.relu.
  template <typename V>
  static V relu(V z) { return at::vec::maximum(z, V(0)); }
  template <typename V>
  static V step(V v) { return V(1) - v.le(V(0)); }
  template <typename V>
  static V exp(V v) { return vec_exp(v); }
};

template <typename T>
constexpr bool kVectorized = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <typename T, typename F, typename... In>
inline void map_row(int64_t n, const F& f, T* out, const In*... in) {
  if constexpr (kVectorized<T>) {
    using V = at::vec::Vectorized<T>;
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      f.template operator()<VecMath>(V::loadu(in + j)...).store(out + j);
    }
    if (j < n) {
      f.template operator()<VecMath>(V::loadu(in + j, n - j)...).store(out + j, static_cast<int>(n - j));
    }
  } else {
    using acc_t = at::opmath_type<T>;
    for (int64_t j = 0; j < n; ++j) {
      out[j] = static_cast<T>(f.template operator()<ScalarMath>(static_cast<acc_t>(in[j])...));
    }
  }
}

// sums[j] += rows[i * n + j] over i < m (column sums of a contiguous block, in the accumulation
// type, rows in order: deterministic).
template <typename T>
inline void add_column_sums(at::opmath_type<T>* sums, const T* rows, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    const T* row = rows + i * n;
    if constexpr (kVectorized<T>) {
      map_row(n, []<typename M, typename V>(V s, V v) { return s + v; }, sums, sums, row);
    } else {
      for (int64_t j = 0; j < n; ++j) sums[j] += static_cast<at::opmath_type<T>>(row[j]);
    }
  }
}

}  // namespace fused_backprop::cpu
