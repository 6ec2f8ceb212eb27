// The CPU kernels on raw pointers, compiled once per SIMD level: kernels_<LEVEL>.cpp includes
// this file and setup.py compiles it with that level's flags and -DCPU_CAPABILITY=<LEVEL>, so
// everything here (and in gemm.h, rowwise.h) lives in namespace fused_backprop::cpu::<LEVEL> and
// two levels never share a symbol. No argument checks here: linear_act_cpu.cpp (compiled once)
// checks, allocates and calls kernels(), the table of the level chosen at run time.
//
// Both kernels walk the rows in panels sized to stay in L2, one panel per task of
// at::parallel_for, and finish each panel while it is still in cache:
//   forward   out_p = act(x_p · Wᵀ + b)                 GEMM onto a copy of b, then act in place
//   backward  dz_p  = g_p ⊙ act'(y_p)                    (or act'(x_p · Wᵀ + b) under recompute)
//             db   += column sums of dz_p                 per-panel partials, summed in order
//             dx_p  = dz_p · W                            GEMM on the cached panel
//             dW   += dz_pᵀ · x_p                         per-thread accumulators (float, double);
//                                                         16-bit: dz is kept, dW = dzᵀ·x is one GEMM
// For float and double, a W larger than L2 (streamed once per panel) or few rows (float where MKL
// runs its own kernels: any number) send both passes to row chunks with multithreaded GEMMs
// instead (use_chunks; the bias joins in their epilogue). The forward (and the backward's chunks)
// pack a float W once for all panels or chunks (SharedB in gemm.h). Our reductions have a fixed
// order for a given thread count, so with a given BLAS the results are deterministic.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "kernels_impl.h is compiled per SIMD level: setup.py defines CPU_CAPABILITY for kernels_<LEVEL>.cpp"
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/rowwise.h"
#include "cpu/tile_gemm.h"

namespace fused_backprop::cpu::CPU_CAPABILITY {

// Bytes of one panel's working set that should stay in (a share of) L2. Tuned on Intel Xeon and
// checked on AMD EPYC (1 MiB L2 per core), where 256- to 4096-row panels gave the same forward
// time, so it stays a constant.
constexpr int64_t kPanelBytes = 256 * 1024;
// Up to this many rows, per-thread panels lose to one multithreaded GEMM (use_chunks).
constexpr int64_t kFewRows = 1024;

// Rows per chunk when W outgrows L2 (forward, backward_chunked): chunks whose output fills half
// the last-level cache, and at least kFewRows rows, so the multithreaded GEMMs are efficient, the
// epilogue finds the chunk in cache and the backward's chunk of dz is no (M, N) buffer. On AMD
// EPYC (32 MiB L3), forward at 8192x1024x1024 against addmm: 512-row chunks 1.12x, 1024 1.06x,
// 2048 1.02x, 4096 1.01x.
int64_t chunk_rows(int64_t m, int64_t row_bytes) {
  return std::min(m, std::max(kFewRows, l3_cache_bytes() / 2 / std::max<int64_t>(row_bytes, 1)));
}

// Panels per parallel task: a task gets at least kMinTaskMacs multiply-adds, so a small layer
// runs on the calling thread (waking the pool costs more than it saves, and far more when the
// machine is busy: 64x16x8 took 11.8 ms with 2 threads on a loaded machine, 0.06 ms eager).
constexpr int64_t kMinTaskMacs = int64_t(1) << 20;
int64_t panel_grain(int64_t rows, int64_t k, int64_t n) {
  return std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(1, rows * std::max<int64_t>(k, 1) * n));
}

// Rows (or columns) of `width` elements per task of an elementwise pass: at least ATen's grain of
// 32768 elements, so small passes stay on the calling thread.
int64_t elementwise_grain(int64_t width) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(width, 1)); }

// Row chunks with multithreaded GEMMs (instead of per-thread panels) for float and double layers
// when W outgrows L2, where panels would stream W once each, and when there are too few rows for
// panels to beat one multithreaded GEMM (measured at M <= 512, 256 <= K, N <= 1024: per-thread
// panels 1.01-1.15x eager's time). Float layers take chunks at every size where MKL runs its own
// kernels (Intel; elsewhere the tile GEMM runs from kTileMinRows rows): on an Intel Xeon (AVX-512
// + AMX, 2 cores), interleaved in one process, chunks / panels at 1025x256x256 forward 0.61,
// training step 0.71; 2048x256x256 0.74 / 0.84; 8192x256x256 0.78 / 0.94; 16384x256x256 0.91 /
// 0.99; 65536x64x64 0.85 / 0.99; 4096x128x128 0.92 / 0.97 (panels took 1.09-1.38x eager's
// forward from 1025 to 8192 rows at K = N = 256). Double layers keep the panels there (16384x256x256:
// panels 0.77x eager's forward, chunks 0.81x; 65536x64x64 0.64x against 0.80x).
template <typename T>
bool use_chunks(int64_t m, int64_t k, int64_t n) {
  return n * k * int64_t(sizeof(T)) > l2_cache_bytes() || m <= kFewRows ||
         (std::is_same_v<T, float> && !tile_gemm_enabled());
}

// Rows per panel. While W fits in L2, panels of about kPanelBytes (at most that, or 256 rows) keep
// each panel's rows in cache between the GEMM and the elementwise work; their number is a multiple
// of the thread count, so every thread gets as many rows (1438 rows in 512-row panels were 3
// panels: one thread idle a third of the time, fused 1.1x slower than eager). A larger W (16-bit
// types; float and double take row chunks) would be streamed again for every panel, so then each
// thread takes one panel (forward at (8192, 1024, 1024): 128-row panels 1.18x addmm, one per
// thread 1.03x).
int64_t panel_rows(int64_t m, int64_t row_bytes, int64_t weight_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (m + threads - 1) / threads;
  if (weight_bytes > l2_cache_bytes()) return std::max<int64_t>(1, per_thread);
  const int64_t rows = std::min(per_thread, std::max<int64_t>(256, kPanelBytes / std::max<int64_t>(row_bytes, 1)));
  const int64_t panels = ((m + rows - 1) / rows + threads - 1) / threads * threads;
  return std::max<int64_t>(1, (m + panels - 1) / panels);
}

// z (r x n) = x (r x k) · Wᵀ + b for a panel: the rows start as copies of b and the GEMM adds to
// them (beta = 1), as addmm does. With beta = 0 MKL first zeroes a small C in a pass of its own
// (mkl_blas_def_sgemm_mscale: 6.9 % of the forward's samples at 65536x64x64 on AMD EPYC, against
// 39 % in the GEMM kernel; the bias copy takes 3 %). The row chunks' large multithreaded GEMMs
// have no such pass: they take beta = 0 and the bias joins in the epilogue.
template <typename T>
void preact_rows(const SharedB<T>& wt, const T* x, int64_t k, const T* b, T* z, int64_t r, int64_t n) {
  for (int64_t i = 0; i < r; ++i) std::memcpy(z + i * n, b, n * sizeof(T));
  wt.gemm(r, {x, k}, z, n, /*accumulate=*/true);
}

// out = act(out + b), b null for no bias (already in out); preact, unless null, gets out + b.
template <typename T, Activation A>
void act_rows(T* out, const T* b, int64_t rows, int64_t n, at::opmath_type<T> a, T* preact) {
  const auto act = [a]<typename M, typename V>(V z) { return Act<A>::template forward<V, M>(z, V(a)); };
  for (int64_t i = 0; i < rows; ++i) {
    T* row = out + i * n;
    if (preact != nullptr) {
      T* z = preact + i * n;
      if (b == nullptr) {
        std::memcpy(z, row, n * sizeof(T));
      } else {
        map_row(n, []<typename M, typename V>(V v, V bias) { return v + bias; }, z, row, b);
      }
      map_row(n, act, row, z);
    } else if (b == nullptr) {
      map_row(n, act, row, row);
    } else {
      map_row(n, [act]<typename M, typename V>(V z, V bias) { return act.template operator()<M>(z + bias); }, row,
              row, b);
    }
  }
}

// Whether a float GEMM of m rows with k_all multiply-adds per output takes tile_gemm.h's kernel:
// enabled for this CPU, a column block of B, packed, in half of L2, and rows enough to pay for
// packing B (an (n x k) copy per call: at one row, 1x256x256 forward took 7x eager's time).
constexpr int64_t kTileMinRows = 256;
bool use_tile_gemm(int64_t m, int64_t k_all) {
  return kHaveTileGemm && m >= kTileMinRows && tile_gemm_enabled() && TileGemm::fits(k_all);
}

// rows(i0, i1) over [r0, r1) on all threads, in blocks of whole tiles with at least kMinTaskMacs
// multiply-adds (k_all per output) per task.
template <typename Rows>
void tile_rows_parallel(int64_t r0, int64_t r1, int64_t k_all, int64_t n, const Rows& rows) {
  const int64_t blocks = (r1 - r0 + kTileRows - 1) / kTileRows;
  at::parallel_for(0, blocks, panel_grain(kTileRows, k_all, n), [&](int64_t b0, int64_t b1) {
    rows(r0 + b0 * kTileRows, std::min(r1, r0 + b1 * kTileRows));
  });
}

// Rows [r0, r1) of tg's C through epi, on all threads, tg packed here. Where A's rows fit in half
// of L2 and tg's column blocks share out evenly, each thread packs the blocks it computes and runs
// all the rows on them: no thread waits for the packing, and the packed lines stay in the cache of
// the core that reads them. Otherwise B is packed first and the threads split the rows, each
// reading all of it (the other threads' blocks from their caches: at 256x256x256 this forward
// took 1.13-1.40x eager's time on AMD EPYC Zen 4, AVX2, in one run against 0.97x unfused).
template <typename Epi>
void tiles_parallel(TileGemm& tg, int64_t r0, int64_t r1, int64_t n, const Epi& epi) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads()), blocks = tg.blocks();
  if (blocks % threads == 0 && (r1 - r0) * tg.k_all() * int64_t(sizeof(float)) <= l2_cache_bytes() / 2) {
    at::parallel_for(0, blocks, 1, [&](int64_t cb0, int64_t cb1) {
      tg.pack(cb0, cb1);
      tg.rows(r0, r1, epi, nullptr, cb0, cb1);
    });
    return;
  }
  tg.pack_all();
  tile_rows_parallel(r0, r1, tg.k_all(), n, [&](int64_t i0, int64_t i1) { tg.rows(i0, i1, epi); });
}

// out = act(x · Wᵀ + b) (and preact = the pre-activation) by the tile GEMM, the epilogue on its
// registers.
template <Activation A>
void forward_tiles(const float* x, const float* w, const float* b, float* out, float* preact, int64_t m, int64_t k,
                   int64_t n, float a) {
  using V = at::vec::Vectorized<float>;
  TileGemm tg({{x, k, w, k, k}}, n);
  const auto epi = [=](int64_t i, int64_t j, V acc, int count) {
    const V z = b != nullptr ? acc + V::loadu(b + j, count) : acc;
    if (preact != nullptr) z.store(preact + i * n + j, count);
    Act<A>::template forward<V, VecMath>(z, V(a)).store(out + i * n + j, count);
  };
  tiles_parallel(tg, 0, m, n, epi);
}

template <typename T, Activation A>
void forward_kernel(const T* x, const T* w, const T* b, T* out, T* preact, int64_t m, int64_t k, int64_t n,
                    at::opmath_type<T> a) {
  if constexpr (std::is_same_v<T, float> && kHaveTileGemm) {
    if (use_tile_gemm(m, k)) return forward_tiles<A>(x, w, b, out, preact, m, k, n, a);
  }
  if (!kReduced<T> && use_chunks<T>(m, k, n)) {
    // One multithreaded GEMM per chunk of rows, then the epilogue on all threads while the chunk
    // is still in the last-level cache.
    const int64_t chunk = chunk_rows(m, n * int64_t(sizeof(T)));
    const SharedB<T> wt({w, k, /*trans=*/true}, m, chunk, k, n);
    for (int64_t c0 = 0; c0 < m; c0 += chunk) {
      const int64_t r = std::min(chunk, m - c0);
      T* out_c = out + c0 * n;
      wt.gemm(r, {x + c0 * k, k}, out_c, n);
      at::parallel_for(0, r, elementwise_grain(n), [&](int64_t i0, int64_t i1) {
        act_rows<T, A>(out_c + i0 * n, b, i1 - i0, n, a, preact ? preact + (c0 + i0) * n : nullptr);
      });
    }
    return;
  }
  const int64_t rows = panel_rows(m, (k + n) * int64_t(sizeof(T)), n * k * int64_t(sizeof(T)));
  const int64_t panels = (m + rows - 1) / rows;
  const SharedB<T> wt({w, k, /*trans=*/true}, m, rows, k, n);
  at::parallel_for(0, panels, panel_grain(rows, k, n), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * rows, r = std::min(rows, m - r0);
      T* out_p = out + r0 * n;
      preact_rows(wt, x + r0 * k, k, b, out_p, r, n);
      act_rows<T, A>(out_p, nullptr, r, n, a, preact ? preact + r0 * n : nullptr);
    }
  });
}

// dz = g where the packed sign mask has its bit, else Act<A>::masked_off_dz(g) (relu: 0, leaky
// relu: a g): the derivative from the mask. Whole bytes go 8 elements at a time: AVX-512 takes the
// bits as a lane mask directly, AVX2 turns them into lanes with one compare, elsewhere a constant
// shift per lane becomes SIMD blends. The unaligned head and the tail go one element at a time.
template <typename T, Activation A>
void dz_from_sign_mask(T* dz, const T* g, const uint8_t* mask, int64_t first, int64_t n, at::opmath_type<T> a) {
  using acc_t = at::opmath_type<T>;
  // Vectors of float or double, or one element (computed in acc_t, as torch does for 16-bit types).
  auto off = [a](auto v) {
    if constexpr (std::is_same_v<decltype(v), T>) {
      return static_cast<T>(Act<A>::masked_off_dz(acc_t(v), a));
    } else {
      return Act<A>::masked_off_dz(v, decltype(v)(a));
    }
  };
  auto one = [&](int64_t j) { dz[j] = (mask[(first + j) >> 3] >> ((first + j) & 7)) & 1 ? g[j] : off(g[j]); };
  int64_t j = 0;
  for (; j < n && (first + j) % 8 != 0; ++j) one(j);
#if defined(CPU_CAPABILITY_AVX512)
  // 16 floats per 2 bytes, 8 doubles per byte.
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 16 <= n; j += 16) {
      uint16_t bits;
      std::memcpy(&bits, mask + ((first + j) >> 3), 2);
      const __m512 gv = _mm512_loadu_ps(g + j);
      _mm512_storeu_ps(dz + j, _mm512_mask_blend_ps(bits, off(at::vec::Vectorized<float>(gv)), gv));
    }
  } else if constexpr (std::is_same_v<T, double>) {
    for (; j + 8 <= n; j += 8) {
      const __m512d gv = _mm512_loadu_pd(g + j);
      _mm512_storeu_pd(dz + j, _mm512_mask_blend_pd(mask[(first + j) >> 3], off(at::vec::Vectorized<double>(gv)), gv));
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // The byte broadcast to every lane, ANDed with the lane's bit: all ones where it is set.
  if constexpr (std::is_same_v<T, float>) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (; j + 8 <= n; j += 8) {
      const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(mask[(first + j) >> 3]), lane_bit);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, lane_bit));
      const __m256 gv = _mm256_loadu_ps(g + j);
      _mm256_storeu_ps(dz + j, _mm256_blendv_ps(off(at::vec::Vectorized<float>(gv)), gv, keep));
    }
  } else if constexpr (std::is_same_v<T, double>) {
    const __m256i lo_bit = _mm256_setr_epi64x(1, 2, 4, 8), hi_bit = _mm256_setr_epi64x(16, 32, 64, 128);
    for (; j + 8 <= n; j += 8) {
      const __m256i byte = _mm256_set1_epi64x(mask[(first + j) >> 3]);
      auto half = [&](__m256i lane_bit, const T* src, T* dst) {
        const __m256i keep = _mm256_cmpeq_epi64(_mm256_and_si256(byte, lane_bit), lane_bit);
        const __m256d gv = _mm256_loadu_pd(src);
        _mm256_storeu_pd(dst, _mm256_blendv_pd(off(at::vec::Vectorized<double>(gv)), gv, _mm256_castsi256_pd(keep)));
      };
      half(lo_bit, g + j, dz + j);
      half(hi_bit, g + j + 4, dz + j + 4);
    }
  }
#endif
  for (; j + 8 <= n; j += 8) {
    const uint8_t bits = mask[(first + j) >> 3];
    for (int i = 0; i < 8; ++i) dz[j + i] = (bits >> i) & 1 ? g[j + i] : off(g[j + i]);
  }
  for (; j < n; ++j) one(j);
}

// dz for rows [r0, r0 + r) into dz (which holds the pre-activation when both y and sign_mask are
// null, the bias added already where b is null): g ⊙ act'(·) from y (the layer output or the
// pre-activation, as kSaved<A> says), the packed sign mask, or the pre-activation in dz.
template <typename T, Activation A>
void form_dz(T* dz, const T* g, const T* y, const uint8_t* sign_mask, const T* b, int64_t r0, int64_t r,
             int64_t n, at::opmath_type<T> a) {
  for (int64_t i = 0; i < r; ++i) {
    T* dz_i = dz + i * n;
    const T* g_i = g + i * n;
    if (sign_mask != nullptr) {
      if constexpr (kSignDecides<A>) dz_from_sign_mask<T, A>(dz_i, g_i, sign_mask, (r0 + i) * n, n, a);
    } else if (y != nullptr) {
      map_row(n, [a]<typename M, typename V>(V go, V v) { return go * grad_from_saved<A, V, M>(v, V(a)); }, dz_i, g_i,
              y + (r0 + i) * n);
    } else if (b == nullptr) {
      map_row(n, [a]<typename M, typename V>(V z, V go) { return go * Act<A>::template grad_from_preact<V, M>(z, V(a)); },
              dz_i, dz_i, g_i);
    } else {
      map_row(n, [a]<typename M, typename V>(V z, V go, V bias) {
                return go * Act<A>::template grad_from_preact<V, M>(z + bias, V(a));
              },
              dz_i, dz_i, g_i, b);
    }
  }
}

// Scratch memory for n elements of T, left uninitialised (a zero-filled std::vector costs a
// memset per call, which shows at small layers: 512x128x128 spent 1/5 of its backward there).
template <typename T>
T* scratch(at::Tensor& holder, int64_t n) {
  holder = at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return holder.mutable_data_ptr<T>();
}

// Backward when W outgrows L2 or there are few rows (float, double): the rows go in chunks; per
// chunk, all threads form their rows of dz and their partial column sums for db while the rows
// are in cache, then dx = dz·W and dW += dzᵀ·x run as multithreaded BLAS calls, which beat
// per-thread panel GEMMs that stream W and a dW accumulator per panel (measured at
// (8192, 1024, 1024): 1.13x two bare GEMMs with per-thread panels). Only one chunk of dz exists.
template <typename T, Activation A>
void backward_chunked(const T* g, const T* x, const T* w, const T* b, const T* y, const uint8_t* sign_mask,
                      int64_t m, int64_t k, int64_t n, T* dx, T* dw, T* db, at::opmath_type<T> a) {
  const int64_t chunk = chunk_rows(m, n * int64_t(sizeof(T)));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor dz_holder;
  T* dz = scratch<T>(dz_holder, chunk * n);
  // db: one partial per thread per chunk (each over a fixed block of rows), summed in thread
  // order, so the result does not depend on scheduling.
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> db_part(db != nullptr ? threads * n : 0), db_acc(db != nullptr ? n : 0, acc_t(0));
  const bool recompute = sign_mask == nullptr && y == nullptr;
  // W packed once for the GEMMs that multiply by it: x·Wᵀ under recompute, dx = dz·W.
  std::optional<SharedB<T>> wt, w_for_dx;
  if (recompute) wt.emplace(Mat<T>{w, k, /*trans=*/true}, m, chunk, k, n);
  if (dx != nullptr) w_for_dx.emplace(Mat<T>{w, k}, m, chunk, n, k);
  for (int64_t c0 = 0; c0 < m; c0 += chunk) {
    const int64_t r = std::min(chunk, m - c0);
    if (recompute) wt->gemm(r, {x + c0 * k, k}, dz, n);
    if (db != nullptr) std::fill(db_part.begin(), db_part.end(), acc_t(0));
    at::parallel_for(0, r, elementwise_grain(n), [&](int64_t i0, int64_t i1) {
      form_dz<T, A>(dz + i0 * n, g + (c0 + i0) * n, y, sign_mask, b, c0 + i0, i1 - i0, n, a);
      if (db != nullptr) add_column_sums(db_part.data() + at::get_thread_num() * n, dz + i0 * n, i1 - i0, n);
    });
    for (int64_t t = 0; db != nullptr && t < threads; ++t) {
      map_row(n, []<typename M, typename V>(V s, V v) { return s + v; }, db_acc.data(), db_acc.data(),
              db_part.data() + t * n);
    }
    if (dx != nullptr) w_for_dx->gemm(r, {dz, n}, dx + c0 * k, k);
    if (dw != nullptr) gemm<T>(n, k, r, {dz, n, /*trans=*/true}, {x + c0 * k, k}, dw, k, /*accumulate=*/c0 > 0);
  }
  if (db != nullptr) std::copy(db_acc.begin(), db_acc.end(), db);
}

// y: the layer output, or null to recompute the pre-activation; sign_mask: relu's packed mask
// in place of y (then y is null).
template <typename T, Activation A>
void backward_kernel(const T* g, const T* x, const T* w, const T* b, const T* y, const uint8_t* sign_mask,
                     int64_t m, int64_t k, int64_t n, T* dx, T* dw, T* db, at::opmath_type<T> a) {
  using acc_t = at::opmath_type<T>;
  if (!kReduced<T> && use_chunks<T>(m, k, n)) {
    return backward_chunked<T, A>(g, x, w, b, y, sign_mask, m, k, n, dx, dw, db, a);
  }
  const int64_t rows = panel_rows(m, (2 * n + k) * int64_t(sizeof(T)), n * k * int64_t(sizeof(T)));
  const int64_t panels = (m + rows - 1) / rows;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // dW: per-thread accumulators in T for float/double; 16-bit types keep dz and make dW one
  // GEMM with float accumulation instead of summing rounded partials.
  const bool per_thread_dw = dw != nullptr && !kReduced<T>;

  // dz lives in a per-thread panel buffer, or in one (m, n) buffer when dW needs all of it.
  const bool keep_dz = dw != nullptr && !per_thread_dw;
  at::Tensor dz_holder, dw_holder;
  T* dz_store = scratch<T>(dz_holder, keep_dz ? m * n : threads * rows * n);
  // Thread 0 accumulates straight into dw; the others into buffers summed into it at the end.
  // A thread's first panel overwrites its accumulator; a thread that got no panel adds nothing.
  T* dw_acc = per_thread_dw && threads > 1 ? scratch<T>(dw_holder, (threads - 1) * n * k) : nullptr;
  auto dw_of = [&](int64_t tid) { return tid == 0 ? dw : dw_acc + (tid - 1) * n * k; };
  std::vector<char> dw_started(threads, 0);
  std::vector<acc_t> db_part(db != nullptr ? panels * n : 0, acc_t(0));
  const bool recompute = sign_mask == nullptr && y == nullptr;
  std::optional<SharedB<T>> wt;  // W for the recomputed x·Wᵀ
  if (recompute) wt.emplace(Mat<T>{w, k, /*trans=*/true}, m, rows, k, n);
  // dx = dz · W by the tile GEMM (float): A is each panel's dz, given per call.
  std::optional<TileGemm> dx_tiles;
  if constexpr (std::is_same_v<T, float> && kHaveTileGemm) {
    if (dx != nullptr && use_tile_gemm(m, n)) {
      dx_tiles.emplace(std::initializer_list<TileTerm>{{dz_store, n, w, k, n, /*b_trans=*/true}}, k);
      dx_tiles->pack_all();
    }
  }

  at::parallel_for(0, panels, panel_grain(rows, k, n), [&](int64_t p0, int64_t p1) {
    const int64_t tid = at::get_thread_num();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * rows, r = std::min(rows, m - r0);
      T* dz = keep_dz ? dz_store + r0 * n : dz_store + tid * rows * n;
      const T* g_p = g + r0 * n;
      if (recompute) preact_rows(*wt, x + r0 * k, k, b, dz, r, n);
      form_dz<T, A>(dz, g_p, y, sign_mask, nullptr, r0, r, n, a);
      if (db != nullptr) add_column_sums(db_part.data() + p * n, dz, r, n);
      if constexpr (std::is_same_v<T, float>) {
        if (dx_tiles) {
          dx_tiles->rows(r0, r0 + r, [dx, k]<typename V>(int64_t i, int64_t j, V acc, int count) {
            acc.store(dx + i * k + j, count);
          }, dz);
        }
      }
      if (dx != nullptr && !dx_tiles) gemm<T>(r, k, n, {dz, n}, {w, k}, dx + r0 * k, k);
      if (per_thread_dw) {
        gemm<T>(n, k, r, {dz, n, /*trans=*/true}, {x + r0 * k, k}, dw_of(tid), k, /*accumulate=*/dw_started[tid]);
        dw_started[tid] = 1;
      }
    }
  });

  if (per_thread_dw) {
    if (!dw_started[0]) std::fill_n(dw, n * k, T(0));
    for (int64_t t = 1; t < threads; ++t) {
      if (dw_started[t]) map_row(n * k, []<typename M, typename V>(V a, V c) { return a + c; }, dw, dw, dw_of(t));
    }
  } else if (dw != nullptr) {
    gemm<T>(n, k, m, {dz_store, n, /*trans=*/true}, {x, k}, dw, k);
  }
  if (db != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      acc_t s = 0;
      for (int64_t p = 0; p < panels; ++p) s += db_part[p * n + j];
      db[j] = static_cast<T>(s);
    }
  }
}

// Row chunks of the tangent kernels below: rows [c0, c0 + r) at a time, a multithreaded GEMM each,
// the elementwise work on all threads while the chunk is in the last-level cache.
template <typename F>
void for_chunks(int64_t m, int64_t chunk, F&& f) {
  for (int64_t c0 = 0; c0 < m; c0 += chunk) f(c0, std::min(chunk, m - c0));
}

// c (r x n) = a1 · b1ᵀ + a2 · b2ᵀ for the (r x k) a's and (n x k) b's, a null pair left out (both
// null: zeros).
template <typename T>
void two_gemms(int64_t r, int64_t n, int64_t k, const T* a1, const T* b1, const T* a2, const T* b2, T* c) {
  bool started = false;
  for (auto [a, b] : {std::pair{a1, b1}, std::pair{a2, b2}}) {
    if (a == nullptr || b == nullptr) continue;
    gemm<T>(r, n, k, {a, k}, {b, k, /*trans=*/true}, c, n, /*accumulate=*/started);
    started = true;
  }
  if (!started) std::fill_n(c, r * n, T(0));
}

// The jvp (forward-mode derivative) of the layer: out = act'(z) ⊙ (x_t · Wᵀ + x · W_tᵀ + b_t),
// x_t, w_t, b_t null for zero tangents; act' from y (the output or the pre-activation, as
// kSaved<A>), the sign mask, or (both null) from z = x · Wᵀ + b recomputed into out while the
// tangent goes to a chunk of scratch.
template <typename T, Activation A>
void tangent_kernel(const T* x, const T* w, const T* b, const T* x_t, const T* w_t, const T* b_t, const T* y,
                    const uint8_t* sign_mask, int64_t m, int64_t k, int64_t n, T* out, at::opmath_type<T> a) {
  if constexpr (std::is_same_v<T, float> && kHaveTileGemm) {
    // Both tangent GEMMs in one tile GEMM, act' applied to its registers: from y, or from z
    // recomputed into out by a tile GEMM of its own just before, tile by tile.
    if (sign_mask == nullptr && use_tile_gemm(m, 2 * k)) {
      using V = at::vec::Vectorized<float>;
      TileGemm tg({{x_t, k, w, k, k}, {x, k, w_t, k, k}}, n);
      const auto tangent = [=](int64_t i, int64_t j, V acc, int count) {
        const V t = b_t != nullptr ? acc + V::loadu(b_t + j, count) : acc;
        const V d1 = y != nullptr ? grad_from_saved<A, V, VecMath>(V::loadu(y + i * n + j, count), V(a))
                                  : Act<A>::template grad_from_preact<V, VecMath>(V::loadu(out + i * n + j, count), V(a));
        (t * d1).store(out + i * n + j, count);
      };
      if (y != nullptr) return tiles_parallel(tg, 0, m, n, tangent);
      TileGemm z_tg({{x, k, w, k, k}}, n);
      tg.pack_all();
      z_tg.pack_all();
      const auto preact = [=](int64_t i, int64_t j, V acc, int count) {
        (b != nullptr ? acc + V::loadu(b + j, count) : acc).store(out + i * n + j, count);
      };
      return tile_rows_parallel(0, m, 3 * k, n, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i += kTileRows) {
          z_tg.rows(i, std::min(i1, i + kTileRows), preact);
          tg.rows(i, std::min(i1, i + kTileRows), tangent);
        }
      });
    }
  }
  const int64_t chunk = chunk_rows(m, n * int64_t(sizeof(T)));
  const bool recompute = y == nullptr && sign_mask == nullptr;
  at::Tensor holder;
  T* t_store = recompute ? scratch<T>(holder, chunk * n) : nullptr;
  for_chunks(m, chunk, [&](int64_t c0, int64_t r) {
    T* out_c = out + c0 * n;
    T* t = recompute ? t_store : out_c;
    two_gemms<T>(r, n, k, x_t ? x_t + c0 * k : nullptr, w, x + c0 * k, w_t, t);
    if (recompute) gemm<T>(r, n, k, {x + c0 * k, k}, {w, k, /*trans=*/true}, out_c, n);
    at::parallel_for(0, r, elementwise_grain(n), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* t_i = t + i * n;
        if (b_t != nullptr) map_row(n, []<typename M, typename V>(V v, V bt) { return v + bt; }, t_i, t_i, b_t);
        // recompute: out holds z (+ b), the tangent is the "grad_out" of form_dz
        form_dz<T, A>(recompute ? out_c + i * n : t_i, t_i, y, sign_mask, recompute ? b : nullptr, c0 + i, 1, n, a);
      }
    });
  });
}

// The backward of the backward: given the cotangents ggx (m, k), ggw (n, k), ggb (n) of
// (dx, dW, db) = backward(g, x, W, b), with t = ggx · Wᵀ + x · ggwᵀ + ggb:
//   g_g = t ⊙ act'(z)                 (the gradient reaching grad_out)
//   gz  = t ⊙ g ⊙ act''(z)            (reaching z, then x, W, b through the layer)
//   dz  = g ⊙ act'(z)
//   g_x = gz · W + dz · ggw,  g_W = gzᵀ · x + dzᵀ · ggx,  g_b = Σ_rows gz.
// Any cotangent may be null (zero), any output null (not wanted). act' and act'' from y / the
// sign mask (relu, leaky relu: act'' = 0, so gz = 0) / z recomputed, as tangent_kernel.
template <typename T, Activation A>
void bwd_bwd_kernel(const T* g, const T* x, const T* w, const T* b, const T* y, const uint8_t* sign_mask,
                    const T* ggx, const T* ggw, const T* ggb, int64_t m, int64_t k, int64_t n, T* g_g, T* g_x,
                    T* g_w, T* g_b, at::opmath_type<T> a) {
  using acc_t = at::opmath_type<T>;
  constexpr bool kLinearPieces = kSignDecides<A>;  // act'' = 0
  const int64_t chunk = chunk_rows(m, n * int64_t(sizeof(T)));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool recompute = y == nullptr && sign_mask == nullptr;
  const bool want_gz = !kLinearPieces && (g_x != nullptr || g_w != nullptr || g_b != nullptr);
  at::Tensor t_holder, dz_holder;
  T* t = scratch<T>(t_holder, chunk * n);    // t, then gz
  T* dz = scratch<T>(dz_holder, chunk * n);  // z (recompute), then dz
  std::vector<acc_t> gb_part(g_b != nullptr ? threads * n : 0), gb_acc(g_b != nullptr ? n : 0, acc_t(0));
  // From a kept y, float: t's two GEMMs in one tile GEMM, whose epilogue forms g_g, gz (into t)
  // and dz on its registers.
  const bool tiles = std::is_same_v<T, float> && y != nullptr && use_tile_gemm(m, 2 * k);
  for_chunks(m, chunk, [&](int64_t c0, int64_t r) {
    const T* x_c = x + c0 * k;
    const T* g_c = g + c0 * n;
    if (g_b != nullptr) std::fill(gb_part.begin(), gb_part.end(), acc_t(0));
    if constexpr (std::is_same_v<T, float> && kHaveTileGemm) {
      if (tiles) {
        using V = at::vec::Vectorized<float>;
        TileGemm tg({{ggx, k, w, k, k}, {x, k, ggw, k, k}}, n);
        const auto epi = [&](int64_t i, int64_t j, V acc, int count) {
          const int64_t at = i * n + j, at_c = at - c0 * n;
          const V tv = ggb != nullptr ? acc + V::loadu(ggb + j, count) : acc;
          const V v = V::loadu(y + at, count), gv = V::loadu(g + at, count);
          const V d1 = grad_from_saved<A, V, VecMath>(v, V(a));
          if (g_g != nullptr) (tv * d1).store(g_g + at, count);
          if constexpr (!kLinearPieces) {
            if (want_gz) {
              const V gz = tv * gv * grad2_from_saved<A, V, VecMath>(v, V(a));
              gz.store(t + at_c, count);
              if (g_b != nullptr) {
                float* part = gb_part.data() + at::get_thread_num() * n + j;
                (V::loadu(part, count) + gz).store(part, count);
              }
            }
          }
          if (g_x != nullptr || g_w != nullptr) (gv * d1).store(dz + at_c, count);
        };
        tiles_parallel(tg, c0, c0 + r, n, epi);
      }
    }
    if (!tiles) {
      two_gemms<T>(r, n, k, ggx ? ggx + c0 * k : nullptr, w, x_c, ggw, t);
      if (recompute) gemm<T>(r, n, k, {x_c, k}, {w, k, /*trans=*/true}, dz, n);
      at::parallel_for(0, r, elementwise_grain(n), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          T *t_i = t + i * n, *dz_i = dz + i * n;
          const T* g_i = g_c + i * n;
          const T* v = recompute ? dz_i : y != nullptr ? y + (c0 + i) * n : nullptr;  // null: the sign mask
          // The values act' and act'' are read from, and what to add to them: b to a recomputed z;
          // otherwise v again, which the derivatives below do not read.
          const T* add = recompute ? b : v;
          const auto d1 = [a, recompute]<typename M, typename V>(V vv, V bb) {
            return recompute ? Act<A>::template grad_from_preact<V, M>(vv + bb, V(a)) : grad_from_saved<A, V, M>(vv, V(a));
          };
          // out = f ⊙ act'(·), from the sign mask or v (out may be v: each element is read first).
          auto times_grad = [&](T* out, const T* f) {
            if (v == nullptr) {
              form_dz<T, A>(out, f, nullptr, sign_mask, nullptr, c0 + i, 1, n, a);
            } else {
              map_row(n, [d1]<typename M, typename V>(V fv, V vv, V bb) { return fv * d1.template operator()<M>(vv, bb); },
                      out, f, v, add);
            }
          };
          if (ggb != nullptr) map_row(n, []<typename M, typename V>(V tv, V bt) { return tv + bt; }, t_i, t_i, ggb);
          if (g_g != nullptr) times_grad(g_g + (c0 + i) * n, t_i);
          if constexpr (!kLinearPieces) {
            if (want_gz) {
              map_row(n, [a, recompute]<typename M, typename V>(V tv, V go, V vv, V bb) {
                        return tv * go * (recompute ? Act<A>::template grad2_from_preact<V, M>(vv + bb, V(a))
                                                    : grad2_from_saved<A, V, M>(vv, V(a)));
                      },
                      t_i, t_i, g_i, v, add);
              if (g_b != nullptr) add_column_sums(gb_part.data() + at::get_thread_num() * n, t_i, 1, n);
            }
          }
          if (g_x != nullptr || g_w != nullptr) times_grad(dz_i, g_i);  // last: recompute's z lives in dz_i
        }
      });
    }
    for (int64_t p = 0; g_b != nullptr && want_gz && p < threads; ++p) {
      map_row(n, []<typename M, typename V>(V s, V v) { return s + v; }, gb_acc.data(), gb_acc.data(),
              gb_part.data() + p * n);
    }
    if (g_x != nullptr) {
      T* gx_c = g_x + c0 * k;
      bool started = false;
      if (want_gz) gemm<T>(r, k, n, {t, n}, {w, k}, gx_c, k), started = true;
      if (ggw != nullptr) gemm<T>(r, k, n, {dz, n}, {ggw, k}, gx_c, k, started), started = true;
      if (!started) std::fill_n(gx_c, r * k, T(0));
    }
    if (g_w != nullptr) {
      const bool first = c0 == 0;
      bool started = !first;
      if (want_gz) gemm<T>(n, k, r, {t, n, /*trans=*/true}, {x_c, k}, g_w, k, started), started = true;
      if (ggx != nullptr) gemm<T>(n, k, r, {dz, n, /*trans=*/true}, {ggx + c0 * k, k}, g_w, k, started), started = true;
      if (!started) std::fill_n(g_w, n * k, T(0));
    }
  });
  if (g_b != nullptr) {
    for (int64_t j = 0; j < n; ++j) g_b[j] = static_cast<T>(gb_acc[j]);
  }
}

template <typename T, Activation A>
void sign_mask_bytes(const T* y, int64_t numel, uint8_t* bytes, int64_t j0, int64_t j1) {
  int64_t j = j0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // Act<A>::mask_bit as one compare: NLE_UQ ("not <= 0", true for NaN) or GT_OQ ("> 0", false).
  constexpr int kCmp = Act<A>::kMaskBitOfNaN ? _CMP_NLE_UQ : _CMP_GT_OQ;
#endif
#if defined(CPU_CAPABILITY_AVX512)
  // 16 floats give two bytes.
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 2 <= j1 && (j + 2) * 8 <= numel; j += 2) {
      const uint16_t bits = _mm512_cmp_ps_mask(_mm512_loadu_ps(y + j * 8), _mm512_setzero_ps(), kCmp);
      std::memcpy(bytes + j, &bits, 2);
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    for (; j < j1 && (j + 1) * 8 <= numel; ++j) {
      const __m256 set = _mm256_cmp_ps(_mm256_loadu_ps(y + j * 8), _mm256_setzero_ps(), kCmp);
      bytes[j] = static_cast<uint8_t>(_mm256_movemask_ps(set));
    }
  }
#endif
  for (; j < j1; ++j) {
    uint8_t byte = 0;
    for (int64_t i = 0; i < 8 && j * 8 + i < numel; ++i) byte |= uint8_t(Act<A>::mask_bit(y[j * 8 + i])) << i;
    bytes[j] = byte;
  }
}

}  // namespace fused_backprop::cpu::CPU_CAPABILITY

#include "cpu/small_m.h"  // small_forward, small_backward: built on the kernels above

namespace fused_backprop::cpu::CPU_CAPABILITY {

// The entry points of the table: the dtype and activation become template arguments.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fused_backprop_cpu",
                                  [&] { f(static_cast<scalar_t*>(nullptr)); });
}

inline void forward(const ForwardArgs& a) {
  dispatch_dtype(a.dtype, [&]<typename T>(T*) {
    dispatch_activation(a.act, [&]<Activation A>() {
      if (small_forward<T, A>(static_cast<const T*>(a.x), static_cast<const T*>(a.w), static_cast<const T*>(a.b),
                              static_cast<T*>(a.out), static_cast<T*>(a.preact), a.m, a.k, a.n,
                              static_cast<at::opmath_type<T>>(a.a))) {
        return;
      }
      forward_kernel<T, A>(static_cast<const T*>(a.x), static_cast<const T*>(a.w), static_cast<const T*>(a.b),
                           static_cast<T*>(a.out), static_cast<T*>(a.preact), a.m, a.k, a.n,
                           static_cast<at::opmath_type<T>>(a.a));
    });
  });
}

inline void backward(const BackwardArgs& a) {
  dispatch_dtype(a.dtype, [&]<typename T>(T*) {
    dispatch_activation(a.act, [&]<Activation A>() {
      if (small_backward<T, A>(static_cast<const T*>(a.g), static_cast<const T*>(a.x), static_cast<const T*>(a.w),
                               static_cast<const T*>(a.b), static_cast<const T*>(a.y), a.sign_mask, a.m, a.k, a.n,
                               static_cast<T*>(a.dx), static_cast<T*>(a.dw), static_cast<T*>(a.db),
                               static_cast<at::opmath_type<T>>(a.a))) {
        return;
      }
      backward_kernel<T, A>(static_cast<const T*>(a.g), static_cast<const T*>(a.x), static_cast<const T*>(a.w),
                            static_cast<const T*>(a.b), static_cast<const T*>(a.y), a.sign_mask, a.m, a.k, a.n,
                            static_cast<T*>(a.dx), static_cast<T*>(a.dw), static_cast<T*>(a.db),
                            static_cast<at::opmath_type<T>>(a.a));
    });
  });
}

inline void sign_mask_pack(at::ScalarType dtype, Activation act, const void* y, int64_t numel, uint8_t* bytes) {
  dispatch_dtype(dtype, [&]<typename T>(T*) {
    dispatch_activation(act, [&]<Activation A>() {
      if constexpr (kSignDecides<A>) {  // the glue admits no other (check_sign_mask_activation)
        at::parallel_for(0, (numel + 7) / 8, at::internal::GRAIN_SIZE / 8, [&](int64_t j0, int64_t j1) {
          sign_mask_bytes<T, A>(static_cast<const T*>(y), numel, bytes, j0, j1);
        });
      }
    });
  });
}

inline void tangent(const TangentArgs& a) {
  dispatch_dtype(a.dtype, [&]<typename T>(T*) {
    dispatch_activation(a.act, [&]<Activation A>() {
      auto p = [](const void* v) { return static_cast<const T*>(v); };
      tangent_kernel<T, A>(p(a.x), p(a.w), p(a.b), p(a.x_t), p(a.w_t), p(a.b_t), p(a.y), a.sign_mask, a.m, a.k, a.n,
                           static_cast<T*>(a.out), static_cast<at::opmath_type<T>>(a.a));
    });
  });
}

inline void bwd_bwd(const BwdBwdArgs& a) {
  dispatch_dtype(a.dtype, [&]<typename T>(T*) {
    dispatch_activation(a.act, [&]<Activation A>() {
      auto p = [](const void* v) { return static_cast<const T*>(v); };
      auto o = [](void* v) { return static_cast<T*>(v); };
      bwd_bwd_kernel<T, A>(p(a.g), p(a.x), p(a.w), p(a.b), p(a.y), a.sign_mask, p(a.ggx), p(a.ggw), p(a.ggb), a.m,
                           a.k, a.n, o(a.g_g), o(a.g_x), o(a.g_w), o(a.g_b), static_cast<at::opmath_type<T>>(a.a));
    });
  });
}

#define FB_STRINGIFY2(x) #x
#define FB_STRINGIFY(x) FB_STRINGIFY2(x)
// Declared in kernels.h; constant-initialised, so no code of this level runs at load time.
constinit const Kernels kernels{FB_STRINGIFY(CPU_CAPABILITY), kHaveTileGemm, &forward, &backward, &sign_mask_pack, &tangent,
                                &bwd_bwd};
#undef FB_STRINGIFY
#undef FB_STRINGIFY2

}  // namespace fused_backprop::cpu::CPU_CAPABILITY
