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
// Part of kernels_impl.h (compiled per SIMD level): uses its preact_rows, act_rows, form_dz and scratch.
#pragma once

#include <array>

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

// z[r] = W_r · x + b[r] for R consecutive rows of W (k wide) from w: one vector accumulator per row.
template <typename T, int R>
void dot_rows(const T* x, const T* w, const T* b, T* z, int64_t k) {
  using V = at::vec::Vectorized<T>;
  std::array<V, R> acc;
  acc.fill(V(T(0)));
  const auto step = [&](int64_t c, int64_t count) {  // the tail loads zeros past k
    const V xv = V::loadu(x + c, count);
    for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(xv, V::loadu(w + r * k + c, count), acc[r]);
  };
  int64_t c = 0;
  for (; c + V::size() <= k; c += V::size()) step(c, V::size());
  if (c < k) step(c, k - c);
  for (int r = 0; r < R; ++r) {
    z[r] = at::vec::vec_reduce_all<T>([](V u, V v) { return u + v; }, acc[r]) + b[r];
  }
}

// z (n) = W · x + b: the GEMV of a single row, 4 rows of W at a time.
template <typename T>
void row_gemv(const T* x, const T* w, const T* b, T* z, int64_t k, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dot_rows<T, 4>(x, w + j * k, b + j, z + j, k);
  for (; j < n; ++j) dot_rows<T, 1>(x, w + j * k, b + j, z + j, k);
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

// forward_kernel for a small layer; false (nothing done) when it is not one.
template <typename T, Activation A>
bool small_forward(const T* x, const T* w, const T* b, T* out, T* preact, int64_t m, int64_t k, int64_t n,
                   at::opmath_type<T> a) {
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
  if (db != nullptr) {
    std::vector<at::opmath_type<T>> sums(n, 0);
    add_column_sums(sums.data(), dz, m, n);
    for (int64_t j = 0; j < n; ++j) db[j] = static_cast<T>(sums[j]);
  }
  if (row) {
    row_backward(dz, x, w, dx, dw, k, n);
    return true;
  }
  if (dx != nullptr) gemm<T>(m, k, n, {dz, n}, {w, k}, dx, k);
  if (dw != nullptr) gemm<T>(n, k, m, {dz, n, /*trans=*/true}, {x, k}, dw, k);
  return true;
}

}  // namespace fused_backprop::cpu::CPU_CAPABILITY
