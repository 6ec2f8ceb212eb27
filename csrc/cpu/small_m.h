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
  if (kReduced<T> || !run_serial(m, k, n, sizeof(T))) return false;
  SerialBlas serial;
  preact_rows(SharedB<T>({w, k, /*trans=*/true}, m, m, k, n), x, k, b, out, m, n);  // one block: not packed
  act_rows<T, A>(out, nullptr, m, n, a, preact);
  return true;
}

// backward_kernel for a small layer; false (nothing done) when it is not one.
template <typename T, Activation A>
bool small_backward(const T* g, const T* x, const T* w, const T* b, const T* y, const uint8_t* sign_mask, int64_t m,
                    int64_t k, int64_t n, T* dx, T* dw, T* db, at::opmath_type<T> a) {
  if (kReduced<T> || !run_serial(m, k, n, sizeof(T))) return false;
  SerialBlas serial;
  at::Tensor holder;
  T* dz = scratch<T>(holder, m * n);
  if (y == nullptr && sign_mask == nullptr) {  // recompute z = x·Wᵀ + b into dz
    preact_rows(SharedB<T>({w, k, /*trans=*/true}, m, m, k, n), x, k, b, dz, m, n);
  }
  form_dz<T, A>(dz, g, y, sign_mask, nullptr, 0, m, n, a);
  if (db != nullptr) {
    std::vector<at::opmath_type<T>> sums(n, 0);
    add_column_sums(sums.data(), dz, m, n);
    for (int64_t j = 0; j < n; ++j) db[j] = static_cast<T>(sums[j]);
  }
  if (dx != nullptr) gemm<T>(m, k, n, {dz, n}, {w, k}, dx, k);
  if (dw != nullptr) gemm<T>(n, k, m, {dz, n, /*trans=*/true}, {x, k}, dw, k);
  return true;
}

}  // namespace fused_backprop::cpu::CPU_CAPABILITY
