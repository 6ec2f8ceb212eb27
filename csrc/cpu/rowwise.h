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

#include "activation.h"

namespace fused_backprop::cpu {

struct VecMath {
  // at::vec::maximum propagates NaN, like torch.relu.
  template <typename V>
  static V relu(V z) { return at::vec::maximum(z, V(0)); }
  template <typename V>
  static V step(V v) { return V(1) - v.le(V(0)); }
  template <typename V>
  static V exp(V v) { return v.exp(); }
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
