// e^x, erf(x) and tanh(x) for float and double, vectorised with no libm call: the DEFAULT level's
// math (x86-64 without AVX2, and aarch64), where at::vec's Vectorized exp, erf and tanh call libm
// once per lane. Written on GCC/Clang vector extensions of the baseline width (16 bytes: SSE2,
// NEON), so the compiler emits vector code without any target flag; rowwise.h applies them to a
// Vectorized's lanes 16 bytes at a time. Also holds the tables the AVX2 and AVX-512 exps of
// rowwise.h share. The double polynomials' coefficients come from scripts/fit_portable_math.py
// (which prints them with their errors), the float erf's from the numpy fits named below.
//
// Compiled once per SIMD level (kernels_impl.h): everything here lives in the level's namespace.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fused_backprop::cpu::CPU_CAPABILITY {

// 2^(j/32) rounded to float, and ln(that float) - j ln2/32 (computed in double). Constants, not
// computed at load time: a dynamic initializer in this file would run, compiled for this level,
// on every CPU that loads the library.
alignas(64) constexpr float kExpPow2[32] = {
    0x1.0p+0f,      0x1.059b0ep+0f, 0x1.0b5586p+0f, 0x1.11301ep+0f, 0x1.172b84p+0f, 0x1.1d4874p+0f,
    0x1.2387a6p+0f, 0x1.29e9ep+0f,  0x1.306fep+0f,  0x1.371a74p+0f, 0x1.3dea64p+0f, 0x1.44e086p+0f,
    0x1.4bfdaep+0f, 0x1.5342b6p+0f, 0x1.5ab07ep+0f, 0x1.6247ecp+0f, 0x1.6a09e6p+0f, 0x1.71f75ep+0f,
    0x1.7a1148p+0f, 0x1.82589ap+0f, 0x1.8ace54p+0f, 0x1.93737cp+0f, 0x1.9c4918p+0f, 0x1.a5503cp+0f,
    0x1.ae89fap+0f, 0x1.b7f77p+0f,  0x1.c199bep+0f, 0x1.cb720ep+0f, 0x1.d5818ep+0f, 0x1.dfc974p+0f,
    0x1.ea4afap+0f, 0x1.f50766p+0f,
};
alignas(64) constexpr float kExpLogErr[32] = {
    0.0f,            0x1.947416p-25f,  -0x1.8d96d4p-25f, 0x1.dda2fep-25f,  0x1.9c0c22p-27f,  0x1.a2fbb4p-25f,
    -0x1.964902p-25f, 0x1.2b0dbcp-25f, -0x1.125002p-25f, 0x1.cde8cep-26f,  -0x1.370be4p-25f, -0x1.336de4p-30f,
    0x1.0a3552p-25f,  0x1.c541b6p-26f, 0x1.00d8acp-27f,  0x1.6cb284p-25f,  -0x1.26055cp-26f, -0x1.8b2bb8p-26f,
    0x1.05cb44p-25f,  0x1.1c2142p-26f, -0x1.67a1cap-28f, 0x1.348e56p-25f,  -0x1.a3b5e4p-28f, 0x1.0b7ec8p-25f,
    0x1.f9c306p-27f,  0x1.e4c886p-26f, 0x1.6961b4p-28f,  0x1.b5151ep-28f,  0x1.a5217cp-28f,  0x1.ab7132p-26f,
    -0x1.61428ep-28f, 0x1.2ad5f8p-27f,
};

// tanh(z) = z + z³ P(z²) for float |z| < 0.625: P's coefficients, highest first (rowwise.h's
// vec_tanh, and tanh below).
constexpr float kTanhSmallFloat[] = {-0.005691935773938894f, 0.02062624879181385f, -0.05373530462384224f,
                                     0.13331380486488342f, -0.3333328068256378f};

namespace portable {

// Inlined into the row loops whatever their size: a call per 16 bytes would cost more than it saves.
#define FB_PORTABLE_INLINE __attribute__((always_inline)) inline

using f4 = float __attribute__((vector_size(16)));
using i4 = int32_t __attribute__((vector_size(16)));
using d2 = double __attribute__((vector_size(16)));
using l2 = int64_t __attribute__((vector_size(16)));
using u2 = uint64_t __attribute__((vector_size(16)));
using f2 = float __attribute__((vector_size(8)));

// m ? a : b per lane, m a comparison's mask (all ones or all zeros). NaN compares false.
template <typename V, typename M>
FB_PORTABLE_INLINE V select(M m, V a, V b) {
  return (V)((m & (M)a) | (~m & (M)b));
}

// e^v: Tang's table method as rowwise.h's AVX2 exp, with N = 32 (so a cubic suffices) and no
// FMA: v = (32k + j) ln2/32 + r, e^v = 2^k · 2^(j/32) · e^r, |r| <= ln2/64; the table entry's
// rounding is folded into r. The two table reads are scalar loads (the baseline has no lane
// permute); 2^k is applied as two exponent-built factors, each a normal float, so a denormal
// result is rounded once and overflow gives inf. Max error 0.534 ULP against float64 for normal
// results (0.76 for denormal ones), against libm's 0.502; NaN, ±inf as e^v.
FB_PORTABLE_INLINE f4 exp(f4 v) {
  f4 x = select(v < -104.f, f4{} - 104.f, v);  // e^v is 0 / inf beyond these anyway
  x = select(x > 89.f, f4{} + 89.f, x);
  // n = round(32 v / ln2): adding 1.5 * 2^23 leaves n in the low mantissa bits, j = n mod 32.
  const f4 magic = f4{} + 12582912.f;
  const f4 shifted = x * 46.16624130844683f + magic;
  const i4 bits = (i4)shifted;
  const f4 n = shifted - magic;
  const i4 j = bits & 31;
  const f4 t = {kExpPow2[j[0]], kExpPow2[j[1]], kExpPow2[j[2]], kExpPow2[j[3]]};
  const f4 log_err = {kExpLogErr[j[0]], kExpLogErr[j[1]], kExpLogErr[j[2]], kExpLogErr[j[3]]};
  // ln2/32 in two parts (Cody-Waite): n times the first is exact.
  const f4 r = x - n * 0.02166748046875f - n * -6.631076250e-6f - log_err;
  const f4 q = ((r * (1.f / 6) + 0.5f) * r + 1.f) * r;  // e^r - 1 within 6e-10 relative
  const i4 k = (bits - (i4)magic) >> 5;  // floor(n / 32)
  const i4 k1 = k >> 1, k2 = k - k1;
  return (t * q + t) * (f4)((k1 + 127) << 23) * (f4)((k2 + 127) << 23);
}

template <typename V>
FB_PORTABLE_INLINE bool any(V mask) {
  for (int i = 0; i < int(sizeof(V) / sizeof(mask[0])); ++i) {
    if (mask[i]) return true;
  }
  return false;
}

// p(t) = c[0] + c[1] t + ... + c[N-1] t^(N-1), Horner.
template <typename V, std::size_t N>
FB_PORTABLE_INLINE V horner(V t, const double (&c)[N]) {
  V p = V{} + c[N - 1];
#pragma GCC unroll 20
  for (int i = int(N) - 2; i >= 0; --i) p = p * t + c[i];
  return p;
}

// e^v in double: v = n ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial to r^13 (truncation
// 4e-18 relative), 2^n applied as two exponent-built factors (so denormal results are rounded
// once and overflow gives inf). ln2 in two parts (Cody-Waite): n times the first is exact.
FB_PORTABLE_INLINE d2 exp(d2 v) {
  constexpr double kInvFactorial[] = {1.0, 1.0, 0.5, 0.16666666666666666, 0.041666666666666664,
                                      0.008333333333333333, 0.001388888888888889, 0.0001984126984126984,
                                      2.48015873015873e-05, 2.7557319223985893e-06, 2.755731922398589e-07,
                                      2.505210838544172e-08, 2.08767569878681e-09, 1.6059043836821613e-10};
  d2 x = select(v < -746.0, d2{} - 746.0, v);  // e^v is 0 / inf beyond these anyway
  x = select(x > 710.0, d2{} + 710.0, x);
  const d2 magic = d2{} + 0x1.8p52;  // adding it leaves round(v / ln2) in the low mantissa bits
  const d2 shifted = x * 1.4426950408889634 + magic;
  const d2 n = shifted - magic;
  const d2 r = x - n * 0x1.62e42feep-1 - n * 1.9082149292705877e-10;
  const l2 k = (l2)shifted - (l2)magic;
  const l2 k1 = (l2)((u2)(k + 2048) >> 1) - 1024, k2 = k - k1;  // floor(k / 2), by a logical shift
  return horner(r, kInvFactorial) * (d2)((k1 + 1023) << 52) * (d2)((k2 + 1023) << 52);
}

// tanh(z) in double: z + z³ P(z²) for |z| < 0.55 (P fitted to 7.7e-18), else
// ±(1 - e^(-2|z|)) / (1 + e^(-2|z|)). ±0, ±inf and NaN come out as tanh's.
FB_PORTABLE_INLINE d2 tanh(d2 z) {
  constexpr double kTanhSmall[] = {-0.3333333333333333, 0.13333333333332714, -0.053968253967434016,
                                   0.021869488493666944, -0.008863234397814355, 0.003592110378689024,
                                   -0.001455661830100716, 0.0005889360520074057, -0.0002346347410887237,
                                   8.511313685577671e-05, -2.060276537636634e-05};
  const l2 sign = (l2)z & INT64_MIN;
  const d2 a = (d2)((l2)z & INT64_MAX);
  const l2 small = (l2)(a < 0.55);
  d2 t = d2{};
  if (any(small)) {
    const d2 u = a * a;
    t = a + a * u * horner(u, kTanhSmall);
  }
  if (any(~small)) {
    const d2 e = exp(-2.0 * a);
    t = select(small, t, (1.0 - e) / (1.0 + e));
  }
  return (d2)((l2)t | sign);
}

// erf(v) in double: a + a P(a²) for a = |v| <= 0.875, else 1 - e^(-a²) G(a), G = e^(a²) erfc(a)
// fitted on [0.875, 2.25] and [2.25, 6] (erf rounds to 1 from 5.9 on); a² is split as hi² + δ
// with hi² exact (Veltkamp), so e^(-a²) = e^(-hi²) (1 - δ + δ²/2) carries no rounding of a².
// Each of the three pieces is evaluated only when a lane of the two needs it.
FB_PORTABLE_INLINE d2 erf(d2 v) {
  constexpr double kErfNear[] = {0.1283791670955126, -0.3761263890318374, 0.11283791670954353,
                                 -0.026866170644942594, 0.005223977623059443, -0.0008548326845690305,
                                 0.00012055324561705379, -1.492538720169797e-05, 1.6456607597388118e-06,
                                 -1.6289242608284092e-07, 1.4122777660357666e-08, -8.666276629203472e-10};
  // In t = (2a - 3.125) / 1.375 and t = (2a - 8.25) / 3.75.
  constexpr double kErfcMid[] = {0.31164860864813004, -0.10620311973569799, 0.03321728015275988,
                                 -0.009676628765651408, 0.0026527695077027966, -0.0006896257281813117,
                                 0.00017101306636162436, -4.064299078175511e-05, 9.292734425560545e-06,
                                 -2.050608158566273e-06, 4.3788925287834257e-07, -9.069736534557665e-08,
                                 1.8264186802107935e-08, -3.5791441867756036e-09, 6.769157984058545e-10,
                                 -1.2640172119017655e-10, 2.679503029484486e-11, -4.7562847146837006e-12};
  constexpr double kErfcFar[] = {0.13306497124120825, -0.05736216441672621, 0.024146049109902732,
                                 -0.009939507123895588, 0.004006289225138373, -0.0015829746891527754,
                                 0.000613763811115347, -0.00023373242211014225, 8.749576801194616e-05,
                                 -3.222313945384837e-05, 1.1680795695476637e-05, -4.163290882836347e-06,
                                 1.4653850906966203e-06, -5.201153033922796e-07, 1.777766172679303e-07,
                                 -4.94554728464823e-08, 1.6671726601895664e-08, -1.0811924432341963e-08,
                                 3.480956941133375e-09};
  const l2 sign = (l2)v & INT64_MIN;
  const d2 av = (d2)((l2)v & INT64_MAX);
  const d2 a = select(av > 6.0, d2{} + 6.0, av);
  const l2 near = (l2)(a <= 0.875), mid = (l2)(a <= 2.25) & ~near, far = ~(near | mid);  // NaN: far
  d2 e = d2{};
  if (any(near)) {
    e = a + a * horner(a * a, kErfNear);
  }
  if (any(mid | far)) {
    d2 g = d2{};
    if (any(mid)) g = horner((a + a - 3.125) * (1 / 1.375), kErfcMid);
    if (any(far)) g = select(far, horner((a + a - 8.25) * (1 / 3.75), kErfcFar), g);
    const d2 c = a * 134217729.0, hi = c - (c - a), lo = a - hi;  // hi: a's top 26 bits
    const d2 delta = (hi + hi + lo) * lo;                          // a² - hi²
    const d2 erfc = exp(-(hi * hi)) * (1.0 - delta + 0.5 * delta * delta) * g;
    e = select(near, e, 1.0 - erfc);
  }
  return (d2)((l2)e | sign);
}

// tanh(z) in float: rowwise.h's vec_tanh formula (what the other levels run), on exp above.
FB_PORTABLE_INLINE f4 tanh(f4 z) {
  const i4 sign = (i4)z & INT32_MIN;
  const f4 a = (f4)((i4)z & INT32_MAX), z2 = z * z;
  f4 p = z2 * kTanhSmallFloat[0] + kTanhSmallFloat[1];
  for (int i = 2; i < 5; ++i) p = p * z2 + kTanhSmallFloat[i];
  const f4 small = z * z2 * p + z;
  const f4 big = (f4)((i4)(1.f - 2.f / (exp(a + a) + 1.f)) | sign);
  return select(a < 0.625f, small, big);
}

// erf(a) for 0 <= a <= 1, in double: a P(a²), P the degree-7 least-squares fit of erf(a)/a in
// a² on [0, 1] (numpy.polyfit, 40001 points): 9.5e-11 relative.
FB_PORTABLE_INLINE d2 erf_near(d2 a) {
  constexpr double kP[] = {1.128379167011065,     -0.3761263829081746,     0.11283780860278782,
                           -0.026865368610914576, 0.005220920702213344,    -0.0008483169167447034,
                           0.00011263511552477389, -9.670126183656445e-06};
  return horner(a * a, kP) * a;
}

// erf(a) for 1 <= a <= 4, in double: 1 - Q(t), t = (a - 2.5) / 1.5, Q the degree-18 Chebyshev
// least-squares fit of erfc on [1, 4] (numpy chebfit, then cheb2poly): 4.2e-11 absolute, a
// thousandth of float's ULP of erf there. erf(a) rounds to 1 in float from a = 3.92 on.
FB_PORTABLE_INLINE d2 erf_far(d2 a) {
  constexpr double kQ[] = {
      0.000406952022300372,   -0.003267426320083998,   0.012252847772402157,   -0.02818155357823991,
      0.04365080929252633,    -0.046453594223966665,   0.03187607669662843,    -0.009267674006760502,
      -0.006677462787534593,  0.009621796190996562,    -0.004556667295549377,  -0.0004426733501025707,
      0.0018566954850558202,  -0.0009197438322278293,  -9.68573476824032e-05,  0.00029434012028325843,
      -7.862957702116156e-05, -3.30668325099764e-05,   1.584699895031722e-05};
  return 1.0 - horner((a - 2.5) * (1 / 1.5), kQ);
}

// erf(v), computed in double and rounded once: max error 0.5012 ULP against float64 (libm's erff:
// 0.92). Each of the two ranges is evaluated only when a lane of the pair needs it. NaN, ±inf,
// ±0 as erf.
FB_PORTABLE_INLINE f4 erf(f4 v) {
  const f4 av = (f4)((i4)v & INT32_MAX);
  const f4 a = select(av > 4.f, f4{} + 4.f, av);
  auto pair = [](d2 h) {
    const l2 far = (l2)(h > 1.0);
    if (!any(far)) return erf_near(h);
    if (!any(~far)) return erf_far(h);
    return select(far, erf_far(h), erf_near(h));
  };
  const d2 lo = __builtin_convertvector(__builtin_shufflevector(a, a, 0, 1), d2);
  const d2 hi = __builtin_convertvector(__builtin_shufflevector(a, a, 2, 3), d2);
  const f4 e = __builtin_shufflevector(__builtin_convertvector(pair(lo), f2), __builtin_convertvector(pair(hi), f2),
                                       0, 1, 2, 3);
  return (f4)((i4)e | ((i4)v & INT32_MIN));  // v's sign (e >= 0); NaN stays NaN
}

#undef FB_PORTABLE_INLINE
}  // namespace portable
}  // namespace fused_backprop::cpu::CPU_CAPABILITY
