// Small layers on the calling thread alone: forward and backward of float and double layers with
// at most kSerialMacs (2^18) multiply-adds per GEMM whose weight and output fit in L2, as one BLAS call
// per GEMM with the elementwise work on its output while it is in cache, no at::parallel_for, no
// row chunks or packed W, and MKL told to stay on this thread (mkl_set_num_threads_local).
//
// Why: MKL threads even an 8x64x64 sgemm, and on a machine whose two cores are busy elsewhere a
// parallel region waits for a descheduled thread: addmm at 8x64x64 took 30 ms with two threads
// where one took 15 us (AMD EPYC, 2 cores, another process's tests running; interleaved samples).
// Where the pool is idle, threads cannot pay at this size either: a few microseconds of GEMM.
//
// A single row (M = 1) of any width runs here too, without the BLAS where the tile GEMM runs
// (tile_gemm_enabled: CPUs where MKL takes its generic kernels): x·Wᵀ is a GEMV and the backward's
// dx = dz·W a GEMV and dW = dzᵀ·x a rank-1 update, which MKL runs on one thread at half the speed
// of the vector loops below (1x1024x1024 on AMD EPYC Zen 5: addmm 83 us, the loop 39 us; dx and dW
// by mm + mm 157 us, one pass over the rows of W and dW 82 us). One thread: two waited for a
// descheduled one on the shared machine (7 ms a call), and the row is memory-bound.
//
// A few rows (2 <= M < 256 for the forward, < 1024 for the backward; see use_few_rows) of a
// float layer too large for one thread take GEMMs that read W in place (few_rows_*, below), on
// all threads, where MKL packs W in every call, which at a few rows costs as much as the multiply
// (2x1024x1024 forward: addmm + relu 118 us, these 32 us; 128x1024x1024 training step 4.33 ms
// against 2.14; AMD EPYC Zen 5, AVX-512, 2 threads); where MKL runs its own kernels (Intel) only the
// forward of 4 to 64 rows of a W beyond half of L2.
//
// Part of kernels_impl.h (compiled per SIMD level): uses its preact_rows, act_rows, form_dz and scratch.
#pragma once

extern "C" {
// MKL: the thread count of the calling thread's MKL calls (0: the global one); returns the previous.
// (mkl_service.h's mkl_set_num_threads_local is a macro for it; the lower-case symbol is the
// Fortran entry, which takes a pointer.)
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace fused_backprop::cpu::CPU_CAPABILITY {

// About 5 us of one core's GEMM, where a second thread saves less than it costs to wake: at 2^20
// (256x64x64) the serial forward took 1.28x eager's threaded addmm + relu when its threads were free.
constexpr int64_t kSerialMacs = int64_t(1) << 18;

inline bool run_serial(int64_t m, int64_t k, int64_t n, int64_t elem_bytes) {
  return m * k * n <= kSerialMacs && (m * n + n * k) * elem_bytes <= l2_cache_bytes();
}

// Whether a single row takes the vector loops below instead of the BLAS.
template <typename T>
bool use_row_loops(int64_t m) {
  return kHaveTileGemm && !kReduced<T> && m == 1 && tile_gemm_enabled();
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The sums of the lanes of a, b, c, d, in that order: a quarter of the instructions of four
// separate reductions, which at K = 256 cost about as much as the dot products' FMAs.
inline __m128 sum4(at::vec::Vectorized<float> a, at::vec::Vectorized<float> b, at::vec::Vectorized<float> c,
                   at::vec::Vectorized<float> d) {
#if defined(CPU_CAPABILITY_AVX512)
  const auto half = [](__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); };
  const __m256 a8 = half(a), b8 = half(b), c8 = half(c), d8 = half(d);
#else
  const __m256 a8 = a, b8 = b, c8 = c, d8 = d;
#endif
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));  // per 128-bit half: a b c d
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

// z[r][c] = x_r · W_c + b[c] for R rows of x (k wide, from x) and C consecutive
// rows of W (from w), z's rows ldz apart: R·C vector accumulators along k, reduced at the end.
template <typename T, int R, int C>
void dot_tile(const T* x, const T* w, const T* b, T* z, int64_t k, int64_t ldz) {
  using V = at::vec::Vectorized<T>;
  V acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = V(T(0));
  }
  const auto step = [&](int64_t p, int64_t count) {  // the tail loads zeros past k
    V wv[C];
    for (int c = 0; c < C; ++c) wv[c] = V::loadu(w + c * k + p, count);
    for (int r = 0; r < R; ++r) {
      const V xv = V::loadu(x + r * k + p, count);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  };
  int64_t p = 0;
  for (; p + V::size() <= k; p += V::size()) step(p, V::size());
  if (p < k) step(p, k - p);
  for (int r = 0; r < R; ++r) {
    if constexpr (C == 4 && std::is_same_v<T, float> && kHaveTileGemm) {
      _mm_storeu_ps(z + r * ldz, _mm_add_ps(sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]), _mm_loadu_ps(b)));
    } else {
      for (int c = 0; c < C; ++c) {
        z[r * ldz + c] = at::vec::vec_reduce_all<T>([](V u, V v) { return u + v; }, acc[r][c]) + b[c];
      }
    }
  }
}

// z (n) = W · x + b: the GEMV of a single row, 4 rows of W at a time.
template <typename T>
void row_gemv(const T* x, const T* w, const T* b, T* z, int64_t k, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dot_tile<T, 1, 4>(x, w + j * k, b + j, z + j, k, n);
  for (; j < n; ++j) dot_tile<T, 1, 1>(x, w + j * k, b + j, z + j, k, n);
}

// dx (k) = dz · W (dx null: not wanted), 4 rows of W at a time, then dW (n x k) = dzᵀ · x (dw null:
// not wanted) for a single row dz (n). Two passes: one loop that reads W and writes dW as it goes
// was no faster, and slower for some placements of W and dW.
template <typename T>
void row_backward(const T* dz, const T* x, const T* w, T* dx, T* dw, int64_t k, int64_t n) {
  if (dx != nullptr) {
    std::fill_n(dx, k, T(0));
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const T* w_j = w + j * k;
      map_row(k, [a = dz + j]<typename M, typename V>(V acc, V w0, V w1, V w2, V w3) {
                return at::vec::fmadd(V(a[3]), w3, at::vec::fmadd(V(a[2]), w2, at::vec::fmadd(V(a[1]), w1,
                                                                                      at::vec::fmadd(V(a[0]), w0, acc))));
              },
              dx, dx, w_j, w_j + k, w_j + 2 * k, w_j + 3 * k);
    }
    for (; j < n; ++j) {
      map_row(k, [a = dz[j]]<typename M, typename V>(V acc, V w0) { return at::vec::fmadd(V(a), w0, acc); }, dx, dx,
              w + j * k);
    }
  }
  for (int64_t j = 0; dw != nullptr && j < n; ++j) {
    map_row(k, [a = dz[j]]<typename M, typename V>(V v) { return V(a) * v; }, dw + j * k, x);
  }
}

// MKL on the calling thread alone while it lives (a no-op without MKL).
class SerialBlas {
 public:
  SerialBlas() : prev_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int prev_;
};

// db (n) = the column sums of dz (m x n), accumulated in at::opmath_type<T> on this thread.
template <typename T>
void column_sums_into(T* db, const T* dz, int64_t m, int64_t n) {
  std::vector<at::opmath_type<T>> sums(n, 0);
  add_column_sums(sums.data(), dz, m, n);
  std::copy(sums.begin(), sums.end(), db);
}

// A few rows of a wider layer (float, more than kSerialMacs, where the tile GEMM runs; rows as
// use_few_rows says): the GEMMs read W and the operands in place, each once per call, without
// packing. The BLAS packs W in every call (and eager's addmm as well), which at a few rows costs
// as much as the multiply; the tile GEMM packs it too, so it starts at kTileMinRows.
//   forward  z = x·Wᵀ + b: dot_tile's dot products, kDotRows rows of x against kDotCols rows of W,
//            the epilogue on strips of kStripCols columns of z while they are in cache
//   dx = dz·W   InPlaceTileGemm, B = W's rows; threads split the columns of dx
//   dW = dzᵀ·x  InPlaceTileGemm, A = dz read transposed, B = x's rows; threads split W's rows
//
// Where these loops run: the forward below kTileMinRows rows (the packed tile GEMM from there) and
// from K = kDotMinK (at K = 64, four vector steps per dot product do not pay for its reduction:
// 128x64x64 took 1.05x the BLAS's time); the backward below kFewRows (where the chunked backward's
// multithreaded GEMMs pack W), at AVX2 only below 16 rows or for a W within half of L2: its 16
// columns per tile read one cache line per row of a large W, and from 32 rows MKL's AVX2 GEMM,
// packing included, was faster (one thread, AMD EPYC Zen 5 at AVX2, training step, these loops /
// MKL at K = N = 1024: 8 rows 0.61, 16 rows 0.91, 32 rows 1.07, 128 rows 1.22; at 256: 0.86 at
// 32 rows, 0.88 at 128, 0.93 at 512).
constexpr int64_t kDotMinK = 128;
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kBackwardAnyWeight = true;
constexpr int kDotRows = 4, kDotCols = 4;  // 16 accumulators of the 32 zmm registers
constexpr int64_t kBlasFewRowsMax = 64;    // use_few_rows, below
#else
constexpr bool kBackwardAnyWeight = false;
// 12 of the 16 ymm; 2 x 4 (8 accumulators: two FMAs issued per cycle, 4 cycles each) ran at 60 %
// of this rate (one thread at 128x1024x1024, AMD EPYC Zen 5)
constexpr int kDotRows = 3, kDotCols = 4;
constexpr int64_t kBlasFewRowsMax = 16;
#endif
// Where MKL runs its own kernels (Intel), its GEMMs beat these loops but in the forward of 4 to
// kBlasFewRowsMax rows with a W of at least half of L2, which MKL packs in every call (Intel Xeon,
// AVX-512 + AMX, 2 threads, interleaved, fused/eager forward by the loops / by MKL: K = N = 1024
// at 4-32 rows 0.55-0.66 / 0.85-0.91, 64 rows 0.90 / 0.95, 128 rows 1.00 / 0.95; 32x512x512 0.63 /
// 0.87; 2 rows, or W in L2, no gain; at AVX2, against MKL's AVX-512 kernels, 4-16 rows 0.60-0.73,
// 32 rows 0.91-0.99, 64 rows 1.17-1.20 by the loops); their backward took 1.0-1.85x eager's
// training step there from 8 rows.
constexpr int64_t kBlasFewRowsMin = 4;
template <typename T>
bool use_few_rows(bool forward, int64_t m, int64_t k, int64_t n) {
  if (!(std::is_same_v<T, float> && kHaveTileGemm && m >= 2 && m * k * n > kSerialMacs)) return false;
  const int64_t weight_bytes = n * k * int64_t(sizeof(float));
  if (blas_by_default()) {
    return forward && m >= kBlasFewRowsMin && m <= kBlasFewRowsMax && k >= kDotMinK && weight_bytes >= l2_cache_bytes() / 2;
  }
  return tile_gemm_enabled() && (forward ? m < kTileMinRows && k >= kDotMinK
                                         : m < kFewRows && (kBackwardAnyWeight || m < 16 || weight_bytes <= l2_cache_bytes() / 2));
}

constexpr int64_t kStripCols = 4 * kDotCols;

// z (m x n) = x · Wᵀ + b, then epi(j0, j1) for each strip of columns [j0, j1) of all rows, on all
// threads.
template <typename Epi>
void few_rows_preact(const float* x, const float* w, const float* b, float* z, int64_t m, int64_t k, int64_t n,
                     const Epi& epi) {
  const int64_t strips = (n + kStripCols - 1) / kStripCols;
  at::parallel_for(0, strips, panel_grain(m, k, kStripCols), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t j0 = s * kStripCols, j1 = std::min(n, j0 + kStripCols);
      for (int64_t j = j0; j < j1; j += kDotCols) {  // kDotCols rows of W in L1 while every row of x passes
        const int64_t cols = std::min<int64_t>(kDotCols, j1 - j);
        for (int64_t i = 0; i < m; i += kDotRows) {
          with_count<kDotRows>(std::min<int64_t>(kDotRows, m - i), [&]<int R>() {
            with_count<kDotCols>(cols, [&]<int C>() { dot_tile<float, R, C>(x + i * k, w + j * k, b + j, z + i * n + j, k, n); });
          });
        }
      }
      epi(j0, j1);
    }
  });
}

template <Activation A>
void few_rows_forward(const float* x, const float* w, const float* b, float* out, float* preact, int64_t m, int64_t k,
                      int64_t n, float a) {
  few_rows_preact(x, w, b, out, m, k, n, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < m; ++i) {
      act_rows<float, A>(out + i * n + j0, nullptr, 1, j1 - j0, a, preact ? preact + i * n + j0 : nullptr);
    }
  });
}

template <Activation A>
void few_rows_backward(const float* g, const float* x, const float* w, const float* b, const float* y,
                       const uint8_t* sign_mask, int64_t m, int64_t k, int64_t n, float* dx, float* dw, float* db,
                       float a) {
  at::Tensor holder;
  float* dz = scratch<float>(holder, m * n);
  if (y == nullptr && sign_mask == nullptr) {  // recompute: z into dz, then dz in place, strip by strip
    few_rows_preact(x, w, b, dz, m, k, n, [&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < m; ++i) {
        form_dz<float, A>(dz + i * n + j0, g + i * n + j0, nullptr, nullptr, nullptr, 0, 1, j1 - j0, a);
      }
    });
  } else {
    at::parallel_for(0, m, elementwise_grain(n), [&](int64_t i0, int64_t i1) {
      form_dz<float, A>(dz + i0 * n, g + i0 * n, y, sign_mask, nullptr, i0, i1 - i0, n, a);
    });
  }
  if (db != nullptr) column_sums_into(db, dz, m, n);
  using V = at::vec::Vectorized<float>;
  if (dx != nullptr) {
    const InPlaceTileGemm tg({{dz, n, w, k, n, /*b_trans=*/true}}, k);
    const auto store = [dx, k](int64_t i, int64_t j, V acc, int count) { acc.store(dx + i * k + j, count); };
    at::parallel_for(0, tg.blocks(), panel_grain(m, n, InPlaceTileGemm::kBlockCols),
                     [&](int64_t cb0, int64_t cb1) { tg.rows(0, m, store, nullptr, cb0, cb1); });
  }
  if (dw != nullptr) {
    const InPlaceTileGemm tg({{dz, n, x, k, m, /*b_trans=*/true, /*a_trans=*/true}}, k);
    const auto store = [dw, k](int64_t i, int64_t j, V acc, int count) { acc.store(dw + i * k + j, count); };
    tile_rows_parallel(0, n, m, k, [&](int64_t i0, int64_t i1) { tg.rows(i0, i1, store); });
  }
}

// forward_kernel for a small layer; false (nothing done) when it is not one.
template <typename T, Activation A>
bool small_forward(const T* x, const T* w, const T* b, T* out, T* preact, int64_t m, int64_t k, int64_t n,
                   at::opmath_type<T> a) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_few_rows<T>(/*forward=*/true, m, k, n)) return few_rows_forward<A>(x, w, b, out, preact, m, k, n, a), true;
  }
  const bool row = use_row_loops<T>(m);
  if (kReduced<T> || !(row || run_serial(m, k, n, sizeof(T)))) return false;
  SerialBlas serial;
  if (row) {
    row_gemv(x, w, b, out, k, n);
  } else {
    preact_rows(SharedB<T>({w, k, /*trans=*/true}, m, m, k, n), x, k, b, out, m, n);  // one block: not packed
  }
  act_rows<T, A>(out, nullptr, m, n, a, preact);
  return true;
}

// backward_kernel for a small layer; false (nothing done) when it is not one.
template <typename T, Activation A>
bool small_backward(const T* g, const T* x, const T* w, const T* b, const T* y, const uint8_t* sign_mask, int64_t m,
                    int64_t k, int64_t n, T* dx, T* dw, T* db, at::opmath_type<T> a) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_few_rows<T>(/*forward=*/false, m, k, n)) return few_rows_backward<A>(g, x, w, b, y, sign_mask, m, k, n, dx, dw, db, a), true;
  }
  const bool row = use_row_loops<T>(m);
  if (kReduced<T> || !(row || run_serial(m, k, n, sizeof(T)))) return false;
  SerialBlas serial;
  at::Tensor holder;
  T* dz = scratch<T>(holder, m * n);
  if (y == nullptr && sign_mask == nullptr) {  // recompute z = x·Wᵀ + b into dz
    if (row) {
      row_gemv(x, w, b, dz, k, n);
    } else {
      preact_rows(SharedB<T>({w, k, /*trans=*/true}, m, m, k, n), x, k, b, dz, m, n);
    }
  }
  form_dz<T, A>(dz, g, y, sign_mask, nullptr, 0, m, n, a);
  if (db != nullptr) column_sums_into(db, dz, m, n);
  if (row) {
    row_backward(dz, x, w, dx, dw, k, n);
    return true;
  }
  if (dx != nullptr) gemm<T>(m, k, n, {dz, n}, {w, k}, dx, k);
  if (dw != nullptr) gemm<T>(n, k, m, {dz, n, /*trans=*/true}, {x, k}, dw, k);
  return true;
}

}  // namespace fused_backprop::cpu::CPU_CAPABILITY
