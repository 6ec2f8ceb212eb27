// The CPU kernels' interface: raw pointers, arguments already checked (linear_act_cpu.cpp).
//
// kernels_impl.h is compiled once per SIMD level (kernels_DEFAULT.cpp, kernels_AVX2.cpp,
// kernels_AVX512.cpp; setup.py gives each ATen's flags for that level), each into its own
// namespace fused_backprop::cpu::<LEVEL>, which defines a `const Kernels kernels` there.
// kernels() returns the table of the level chosen once at run time: the one torch itself runs
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), or the best one built below it.
#pragma once

#include <ATen/core/ScalarType.h>

#include <cstdint>

#include "activation.h"

namespace fused_backprop::cpu {

// out (m, n) = act(x (m, k) · w (n, k)ᵀ + b (n)), and preact (m, n) = the pre-activation unless
// null. `a` is the activation's parameter (leaky relu's negative slope).
struct ForwardArgs {
  at::ScalarType dtype;
  Activation act;
  double a;
  const void *x, *w, *b;
  void *out, *preact;
  int64_t m, k, n;
};

// dx (m, k), dw (n, k), db (n) of the layer from grad_out g (m, n), each null when not wanted.
// The derivative comes from y (m, n): the layer output or the pre-activation, as the activation's
// kSaved says; or from the packed sign mask (relu, leaky relu); or (both null) from the
// pre-activation, recomputed.
struct BackwardArgs {
  at::ScalarType dtype;
  Activation act;
  double a;
  const void *g, *x, *w, *b, *y;
  const uint8_t* sign_mask;
  int64_t m, k, n;
  void *dx, *dw, *db;
};

// out (m, n) = act'(z) ⊙ (x_t · wᵀ + x · w_tᵀ + b_t), the forward-mode derivative; null tangents
// are zero; act' from y / sign_mask as BackwardArgs.
struct TangentArgs {
  at::ScalarType dtype;
  Activation act;
  double a;
  const void *x, *w, *b, *x_t, *w_t, *b_t, *y;
  const uint8_t* sign_mask;
  int64_t m, k, n;
  void* out;
};

// The backward of the backward (kernels_impl.h, bwd_bwd_kernel): from the cotangents ggx, ggw,
// ggb (null: zero) of (dx, dw, db), the gradients g_g, g_x, g_w, g_b (null: not wanted).
struct BwdBwdArgs {
  at::ScalarType dtype;
  Activation act;
  double a;
  const void *g, *x, *w, *b, *y;
  const uint8_t* sign_mask;
  const void *ggx, *ggw, *ggb;
  int64_t m, k, n;
  void *g_g, *g_x, *g_w, *g_b;
};

struct Kernels {
  const char* level;  // "DEFAULT", "AVX2", "AVX512"
  bool has_tile_gemm;  // whether this level has tile_gemm.h's kernel (AVX2, AVX512)
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
  // bytes[j] bit i = Act<act>::mask_bit(y[8j + i]) for the numel elements of y (of type dtype).
  void (*sign_mask_pack)(at::ScalarType dtype, Activation act, const void* y, int64_t numel, uint8_t* bytes);
  void (*tangent)(const TangentArgs&);
  void (*bwd_bwd)(const BwdBwdArgs&);
};

// Each level's table (defined by kernels_impl.h in kernels_<LEVEL>.cpp; only the levels setup.py
// built exist, and it says which with -DFUSED_BACKPROP_HAVE_<LEVEL>).
namespace DEFAULT { extern const Kernels kernels; }
namespace AVX2 { extern const Kernels kernels; }
namespace AVX512 { extern const Kernels kernels; }

// The kernels of the level chosen at run time, on first use.
const Kernels& kernels();

// This machine's per-core L2 and its last-level (L3) cache in bytes, read once (1 MiB and
// 32 MiB when the OS does not say): the kernels' weight-size threshold and row chunks scale
// with them.
int64_t l2_cache_bytes();
int64_t l3_cache_bytes();

// Whether float GEMMs with an epilogue take tile_gemm.h's kernel (at the AVX2 and AVX-512 levels)
// instead of the BLAS: on CPUs other than Intel's, where MKL runs its AVX2 kernels. Read once;
// FUSED_BACKPROP_TILE_GEMM=0 or 1 overrides it (for A/B measurements).
bool tile_gemm_enabled();
// Whether the choice was left to the CPU and MKL runs its own kernels here (Intel): then only the
// few-rows forward of small_m.h leaves the BLAS (see use_few_rows).
bool blas_by_default();

}  // namespace fused_backprop::cpu
