// Row-wise elementwise passes of the CPU kernels, SIMD-wide through at::vec.
//
// map_row(n, f, out, in...) runs out[j] = f(in[j]...) over one contiguous row. f sees
// at::vec::Vectorized values of the compute type (float for bfloat16/float16, whose rows are
// converted to float and back on the fly) and the VecMath policy. f is a generic lambda
// `[]<typename M, typename V>(V a, ...)`, so the activation formulas of activation.h are written
// once and run SIMD-wide at every level.
//
// Compiled once per SIMD level (kernels_impl.h): everything here lives in the level's namespace.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "activation.h"
#include "cpu/portable_math.h"

namespace fused_backprop::cpu::CPU_CAPABILITY {

#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
inline constexpr bool kPortableMath = true;
// The DEFAULT level's math: f (portable_math.h's exp, erf, double tanh, and the selects of
// VecMath) on Vectorized lanes 16 bytes at a time. at::vec's DEFAULT Vectorized calls libm once
// per lane for exp, erf and tanh, and takes its maximum and blendv lane by lane through memory.
template <typename T, typename F, typename... Rest>
FB_HOST_DEVICE at::vec::Vectorized<T> on_portable(F f, at::vec::Vectorized<T> v, Rest... rest) {
  using V = at::vec::Vectorized<T>;
  using P = std::conditional_t<std::is_same_v<T, float>, portable::f4, portable::d2>;
  constexpr int kLanes = sizeof(P) / sizeof(T);
  static_assert(V::size() % kLanes == 0);
  // The 16 bytes at lane i of w (the stores of w that repeat across i are the compiler's to merge).
  auto part = [](V w, int i) __attribute__((always_inline)) {
    alignas(16) T lanes[V::size()];
    w.store(lanes);
    P p;
    std::memcpy(&p, lanes + i, sizeof p);
    return p;
  };
  alignas(16) T out[V::size()];
  for (int i = 0; i < V::size(); i += kLanes) {
    const P result = f(part(v, i), part(rest, i)...);
    std::memcpy(out + i, &result, sizeof result);
  }
  return V::loadu(out);
}
#else
inline constexpr bool kPortableMath = false;
#endif

// e^v, SIMD-wide. At DEFAULT portable_math.h's; at AVX2 and AVX-512, ATen's (Sleef) for double,
// and for float a shorter sequence (Tang's table method): v = (Nk + j) ln2/N + r, so
// e^v = 2^k · 2^(j/N) · e^r with |r| <= ln2/(2N), where e^r needs only a short polynomial. 2^(j/N) comes from a table held
// in registers (AVX-512: N = 32 in two registers, vpermt2ps; AVX2: N = 8 in one, vpermps); its
// float rounding is folded into r (r -= the entry's log error), so the table is effectively
// exact. AVX-512: a cubic, vscalefps applies 2^k (inf, denormals and 0 at the ends without special
// cases); max error 0.53 ULP (checked against float64 at 8M points of [-87.3, 88.7]; Sleef 0.57,
// Cephes' polynomial 1.0), sigmoid on it 0.25 ns per element (one core, 64K floats in L2) against
// Cephes' 0.27 and Sleef's 0.33. AVX2: a quartic, and 2^k as two exponent-built factors (each a
// normal float), so denormal results are rounded once and overflow gives inf.
template <typename V>
FB_HOST_DEVICE V vec_exp(V v) {
  if constexpr (kPortableMath) {
    return on_portable([](auto p) __attribute__((always_inline)) { return portable::exp(p); }, v);
  } else {
    return v.exp();
  }
}

#if defined(CPU_CAPABILITY_AVX512)
FB_HOST_DEVICE at::vec::Vectorized<float> vec_exp(at::vec::Vectorized<float> v) {
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
  r = _mm512_sub_ps(r, lookup(kExpLogErr, j));
  // e^r - 1 = r (1 + r (1/2 + r/6)) within 6e-10 relative for |r| <= ln2/64.
  const __m512 q = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(r, c(1.f / 6), c(0.5f)), r, c(1.f)), r);
  const __m512 t = lookup(kExpPow2, j);
  // vscalefps multiplies by 2^floor(n/32) = 2^k.
  return _mm512_scalef_ps(_mm512_fmadd_ps(t, q, t), _mm512_mul_ps(n, c(1.f / 32)));
}
#elif defined(CPU_CAPABILITY_AVX2)
FB_HOST_DEVICE at::vec::Vectorized<float> vec_exp(at::vec::Vectorized<float> v) {
  auto c = [](float f) { return _mm256_set1_ps(f); };
  // The 8-entry tables are every fourth entry of the 32-entry ones: 2^(j/8) = 2^(4j/32).
  auto table8 = [](const float* t) { return _mm256_setr_ps(t[0], t[4], t[8], t[12], t[16], t[20], t[24], t[28]); };
  // Clamp to where e^v is 0 / inf anyway; vmaxps/vminps return their second operand (v) for NaN.
  const __m256 x = _mm256_min_ps(c(89.f), _mm256_max_ps(c(-104.f), v));
  // n = round(8 v / ln2): adding 1.5 * 2^23 leaves n in the low mantissa bits; vpermps reads
  // j = n mod 8 from the low three.
  const __m256 magic = c(12582912.f);
  const __m256 shifted = _mm256_fmadd_ps(x, c(11.541560327111707f), magic);
  const __m256i bits = _mm256_castps_si256(shifted);
  const __m256 n = _mm256_sub_ps(shifted, magic);
  __m256 r = _mm256_fnmadd_ps(n, c(0.086669921875f), x);  // ln2/8 in two parts (Cody-Waite)
  r = _mm256_fnmadd_ps(n, c(-2.6524305e-5f), r);
  r = _mm256_sub_ps(r, _mm256_permutevar8x32_ps(table8(kExpLogErr), bits));
  // e^r - 1 = r (1 + r (1/2 + r (1/6 + r/24))) within 1.3e-9 for |r| <= ln2/16.
  __m256 q = _mm256_fmadd_ps(r, c(1.f / 24), c(1.f / 6));
  q = _mm256_fmadd_ps(q, r, c(0.5f));
  q = _mm256_mul_ps(_mm256_fmadd_ps(q, r, c(1.f)), r);
  const __m256 t = _mm256_permutevar8x32_ps(table8(kExpPow2), bits);
  const __m256 p = _mm256_fmadd_ps(t, q, t);
  // k = floor(n / 8) in [-151, 128], applied as 2^(k/2) · 2^(k - k/2): both factors are normal
  // floats, and p · 2^k1 is exact, so the result is rounded once.
  const __m256i k = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_castps_si256(magic)), 3);
  const __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  auto pow2i = [](__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2i(k1)), pow2i(k2));
}
#endif

// tanh(z), SIMD-wide. float: z + z³ P(z²) for |z| < 0.625 (P a quartic fitted to tanh's relative
// error there), else ±(1 - 2 / (e^(2|z|) + 1)) on vec_exp: 1.6 ULP against float64 (emulated; 8M
// points), against Sleef's tanh (what torch.tanh and at::vec run, 8x the cost of sigmoid per
// element on AMD EPYC AVX-512). ±0, ±inf and NaN come out as tanh's. double: at::vec's (Sleef).
// At DEFAULT portable_math.h's (for float the same formula).
template <typename V>
FB_HOST_DEVICE V vec_tanh(V z) {
  if constexpr (kPortableMath) {
    return on_portable([](auto p) __attribute__((always_inline)) { return portable::tanh(p); }, z);
  } else if constexpr (std::is_same_v<typename V::value_type, float>) {
    const V ax = z.abs(), z2 = z * z;
    V p = at::vec::fmadd(V(kTanhSmallFloat[0]), z2, V(kTanhSmallFloat[1]));
    for (int i = 2; i < 5; ++i) p = at::vec::fmadd(p, z2, V(kTanhSmallFloat[i]));
    const V small = at::vec::fmadd(z * z2, p, z);
    const V big = (V(1) - V(2) / (vec_exp(ax + ax) + V(1))) | (z & V(-0.f));  // z's sign bit
    return V::blendv(big, small, ax < V(0.625f));
  } else {
    return z.tanh();
  }
}

// erf(v), SIMD-wide: ATen's own at AVX2 and AVX-512 (for float its polynomial: what F.gelu runs
// at the same level), portable_math.h's at DEFAULT.
template <typename V>
FB_HOST_DEVICE V vec_erf(V v) {
  if constexpr (kPortableMath) {
    return on_portable([](auto p) __attribute__((always_inline)) { return portable::erf(p); }, v);
  } else {
    return v.erf();
  }
}

// relu, step and where_positive give what at::vec's maximum, le and blendv give (relu(-0) = +0,
// NaN propagated as torch.relu; step(NaN) = 1; where_positive(NaN, p, q) = q).
struct VecMath {
  template <typename V>
  static FB_HOST_DEVICE V relu(V z) {
    if constexpr (kPortableMath) {
      return on_portable([](auto p) __attribute__((always_inline)) { return portable::select(p <= 0, decltype(p){}, p); }, z);
    } else {
      return at::vec::maximum(z, V(0));
    }
  }
  template <typename V>
  static FB_HOST_DEVICE V step(V v) {
    if constexpr (kPortableMath) {
      return on_portable([](auto p) __attribute__((always_inline)) { return portable::select(p <= 0, decltype(p){}, decltype(p){} + 1); }, v);
    } else {
      return V(1) - v.le(V(0));
    }
  }
  template <typename V>
  static FB_HOST_DEVICE V where_positive(V v, V p, V q) {
    if constexpr (kPortableMath) {
      return on_portable([](auto v, auto p, auto q) __attribute__((always_inline)) { return portable::select(v > 0, p, q); }, v, p, q);
    } else {
      return V::blendv(q, p, v > V(0));
    }
  }
  template <typename V>
  static FB_HOST_DEVICE V exp(V v) { return vec_exp(v); }
  template <typename V>
  static FB_HOST_DEVICE V tanh(V v) { return vec_tanh(v); }
  template <typename V>
  static FB_HOST_DEVICE V erf(V v) { return vec_erf(v); }
};

// bfloat16 and float16: stored 16-bit, computed in float.
template <typename T>
constexpr bool kReduced = at::vec::is_reduced_floating_point_v<T>;

template <typename T, typename F, typename... In>
inline void map_row(int64_t n, const F& f, T* out, const In*... in) {
  if constexpr (kReduced<T>) {
    // A Vectorized<T> holds two Vectorized<float>: f runs on each half.
    using V = at::vec::Vectorized<T>;
    auto run = [&](int64_t j, int64_t count) {
      const auto halves = std::make_tuple(at::vec::convert_to_float<T>(V::loadu(in + j, count))...);
      auto half = [&]<size_t H>() {
        return std::apply([&](const auto&... h) { return f.template operator()<VecMath>(std::get<H>(h)...); }, halves);
      };
      const V result = at::vec::convert_from_float<T>(half.template operator()<0>(), half.template operator()<1>());
      result.store(out + j, static_cast<int>(count));
    };
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) run(j, V::size());
    if (j < n) run(j, n - j);
  } else {
    using V = at::vec::Vectorized<T>;
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      f.template operator()<VecMath>(V::loadu(in + j)...).store(out + j);
    }
    if (j < n) {
      f.template operator()<VecMath>(V::loadu(in + j, n - j)...).store(out + j, static_cast<int>(n - j));
    }
  }
}

// sums[j] += rows[i * n + j] over i < m (column sums of a contiguous block, in the accumulation
// type, rows in order: deterministic).
template <typename T>
inline void add_column_sums(at::opmath_type<T>* sums, const T* rows, int64_t m, int64_t n) {
  using acc_t = at::opmath_type<T>;
  using A = at::vec::Vectorized<acc_t>;
  for (int64_t i = 0; i < m; ++i) {
    const T* row = rows + i * n;
    if constexpr (kReduced<T>) {
      using V = at::vec::Vectorized<T>;
      int64_t j = 0;
      for (; j + V::size() <= n; j += V::size()) {
        const auto [lo, hi] = at::vec::convert_to_float<T>(V::loadu(row + j));
        (A::loadu(sums + j) + lo).store(sums + j);
        (A::loadu(sums + j + A::size()) + hi).store(sums + j + A::size());
      }
      for (; j < n; ++j) sums[j] += static_cast<acc_t>(row[j]);
    } else {
      map_row(n, []<typename M, typename V>(V s, V v) { return s + v; }, sums, sums, row);
    }
  }
}

}  // namespace fused_backprop::cpu::CPU_CAPABILITY
