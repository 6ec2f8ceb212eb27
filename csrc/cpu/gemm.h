// Row-major GEMM on raw pointers for the CPU kernels: C = A·B (+ C when accumulate), where each
// operand may be stored transposed. float and double go straight to the BLAS that ATen itself
// uses (MKL's sgemm_/dgemm_, resolved weakly: a torch build without them falls back to at::mm);
// bfloat16 and float16 go through at::mm (oneDNN, fp32 accumulation). Calling BLAS directly avoids the
// dispatcher and tensor allocations per row panel, which matter at small K and N.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL's packed-operand GEMM (float only); CBLAS enums as ints.
size_t cblas_sgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_sgemm_pack(int, int, int, int, int, int, float, const float*, int, float*) __attribute__((weak));
void cblas_sgemm_compute(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int)
    __attribute__((weak));
}

namespace fused_backprop::cpu::CPU_CAPABILITY {

// A float buffer (a packed weight) that the thread keeps for its next call when it is done: up to
// 16 MiB, and as many buffers as it had alive at once. Allocated per call instead, a few hundred
// KiB each time, it shifted glibc's heap so that the benchmark's 16 MiB outputs were trimmed and
// faulted back in on every other forward (1016 page faults, 5.5 -> 7.2 ms at 16384x256x256).
// It starts empty; resize() leaves the elements uninitialised: the packing writes every one, and
// zeroing them first (std::vector's resize) took 9 % of a 512x256x256 forward on AMD EPYC Zen 4,
// the other thread's packed lines pulled back to the zeroing one.
class KeptBuffer {
 public:
  KeptBuffer() {
    if (!pool().empty()) {
      buf_ = std::move(pool().back());
      pool().pop_back();
    }
  }
  KeptBuffer(const KeptBuffer&) = delete;
  KeptBuffer& operator=(const KeptBuffer&) = delete;
  ~KeptBuffer() {
    if (buf_.capacity > 0 && buf_.capacity <= kMaxKeptFloats) pool().push_back(std::move(buf_));
  }
  void resize(size_t floats) {
    if (floats > buf_.capacity) buf_ = {std::unique_ptr<float[]>(new float[floats]), floats};
    size_ = floats;
  }
  bool empty() const { return size_ == 0; }
  float* data() { return buf_.data.get(); }
  const float* data() const { return buf_.data.get(); }

 private:
  struct Block {
    std::unique_ptr<float[]> data;
    size_t capacity = 0;
  };
  static constexpr size_t kMaxKeptFloats = size_t(4) << 20;
  static std::vector<Block>& pool() {
    thread_local std::vector<Block> kept;
    return kept;
  }
  Block buf_;
  size_t size_ = 0;
};

// A row-major operand: element (i, j) of op(A) is at data[i * ld + j], or data[j * ld + i] when
// transposed.
template <typename T>
struct Mat {
  const T* data;
  int64_t ld;
  bool trans = false;
};

namespace detail {

template <typename T>
at::Tensor as_tensor(const T* data, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  // op(A) is rows x cols; stored transposed it is the transpose of a cols x rows matrix.
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto* p = const_cast<T*>(data);
  if (trans) return at::from_blob(p, {cols, rows}, {ld, 1}, opts).t();
  return at::from_blob(p, {rows, cols}, {ld, 1}, opts);
}

inline bool fits_int(int64_t v) { return v <= INT32_MAX; }

}  // namespace detail

// C (m x n, leading dim ldc) = op(A) (m x k) · op(B) (k x n), plus C's old value if accumulate.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, Mat<T> a, Mat<T> b, T* c, int64_t ldc, bool accumulate = false) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
    }
    return;
  }
  constexpr bool is_float = std::is_same_v<T, float>;
  constexpr bool is_double = std::is_same_v<T, double>;
  const bool blas = (is_float && sgemm_ != nullptr) || (is_double && dgemm_ != nullptr);
  if constexpr (is_float || is_double) {
    if (blas && detail::fits_int(m) && detail::fits_int(n) && detail::fits_int(k) && detail::fits_int(a.ld) &&
        detail::fits_int(b.ld) && detail::fits_int(ldc)) {
      // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: swap the operands, keep the flags.
      const char ta = b.trans ? 'T' : 'N', tb = a.trans ? 'T' : 'N';
      const int mm = int(n), nn = int(m), kk = int(k);
      const int lda = int(std::max<int64_t>(b.ld, 1)), ldb = int(std::max<int64_t>(a.ld, 1));
      const int ldcc = int(std::max<int64_t>(ldc, 1));
      const T one = 1, beta = accumulate ? T(1) : T(0);
      if constexpr (is_float) {
        sgemm_(&ta, &tb, &mm, &nn, &kk, &one, b.data, &lda, a.data, &ldb, &beta, c, &ldcc);
      } else {
        dgemm_(&ta, &tb, &mm, &nn, &kk, &one, b.data, &lda, a.data, &ldb, &beta, c, &ldcc);
      }
      return;
    }
  }
  const at::Tensor at_ = detail::as_tensor(a.data, m, k, a.ld, a.trans);
  const at::Tensor bt_ = detail::as_tensor(b.data, k, n, b.ld, b.trans);
  at::Tensor ct = detail::as_tensor(static_cast<const T*>(c), m, n, ldc, false);
  if (accumulate) {
    ct.addmm_(at_, bt_);
  } else {
    at::mm_out(ct, at_, bt_);
  }
}

// C = op(A) · op(B) for the row chunks or panels of an (m x k) op(A) that share one op(B), e.g. a
// layer's weight. A plain GEMM call packs B into the BLAS's internal layout every time: for
// (8192, 1024, 1024) in 1024-row chunks that is W packed 8 times, for (16384, 256, 256) in 256-row
// panels 64 times. Here float packs it once (MKL's cblas_sgemm_pack, single-threaded) for blocks
// of `rows` rows when at least two full blocks use it and both of W's sides are at least 256. A
// single block is cheaper as a plain GEMM, which packs on all threads (batch 128 through
// 1024x1024 layers: a training step took 1.27x as long packed); so are small weights, where MKL's
// plain sgemm has a faster path (forward over per-thread panels, packed vs plain, relu:
// 65536x64x64 1.20x, 32768x128x128 1.05x, 16384x1024x64 1.02x, 32768x256x128 0.99x, 16384x256x256
// 0.96x, 8192x256x1024 0.98x, 8192x512x512 0.98x). Other types, other block heights or a BLAS
// without packing use gemm().
template <typename T>
class SharedB {
 public:
  SharedB(Mat<T> b, int64_t m, int64_t rows, int64_t k, int64_t n) : b_(b), rows_(rows), k_(k), n_(n) {
    if constexpr (std::is_same_v<T, float>) {
      const bool fits = detail::fits_int(rows) && detail::fits_int(k) && detail::fits_int(n) && detail::fits_int(b.ld);
      if (cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr && fits && rows > 0 && m >= 2 * rows &&
          std::min(k, n) >= kMinPackedDim) {
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(rows), int(n), int(k));
        packed_.resize((bytes + sizeof(float) - 1) / sizeof(float));
        cblas_sgemm_pack(kRowMajor, kBMatrix, b.trans ? kTrans : kNoTrans, int(rows), int(n), int(k), 1.f, b.data,
                         int(b.ld), packed_.data());
      }
    }
  }

  SharedB(const SharedB&) = delete;
  SharedB& operator=(const SharedB&) = delete;

  // C (m x n) = op(A) (m x k) · op(B), plus C's old value if accumulate.
  void gemm(int64_t m, Mat<T> a, T* c, int64_t ldc, bool accumulate = false) const {
    if constexpr (std::is_same_v<T, float>) {
      if (!packed_.empty() && m == rows_ && detail::fits_int(a.ld) && detail::fits_int(ldc)) {
        cblas_sgemm_compute(kRowMajor, a.trans ? kTrans : kNoTrans, kPacked, int(m), int(n_), int(k_), a.data,
                            int(a.ld), packed_.data(), int(b_.ld), accumulate ? 1.f : 0.f, c, int(ldc));
        return;
      }
    }
    CPU_CAPABILITY::gemm<T>(m, n_, k_, a, b_, c, ldc, accumulate);
  }

 private:
  static constexpr int64_t kMinPackedDim = 256;
  enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };

  Mat<T> b_;
  int64_t rows_, k_, n_;
  KeptBuffer packed_;
};

}  // namespace fused_backprop::cpu::CPU_CAPABILITY
