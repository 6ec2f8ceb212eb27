// CPU kernels of linear_act_fwd / linear_act_bwd.
//
// Both walk the rows in panels sized to stay in L2, one panel per task of at::parallel_for, and
// finish each panel while it is still in cache:
//   forward   out_p = act(x_p · Wᵀ + b)                 GEMM, then bias + activation in place
//   backward  dz_p  = g_p ⊙ act'(y_p)                    (or act'(x_p · Wᵀ + b) under recompute)
//             db   += column sums of dz_p                 per-panel partials, summed in order
//             dx_p  = dz_p · W                            GEMM on the cached panel
//             dW   += dz_pᵀ · x_p                         per-thread accumulators (float, double);
//                                                         16-bit: dz is kept, dW = dzᵀ·x is one GEMM
// For float and double, a W larger than L2 (streamed once per panel) or few rows send both passes
// to row chunks with multithreaded GEMMs instead (use_chunks). The forward (and the backward's
// chunks) pack a float W once for all panels or chunks (SharedB in gemm.h). Our reductions have
// a fixed order for a given thread count, so with a given BLAS the results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include <vector>

#include "cpu/gemm.h"
#include "cpu/rowwise.h"
#include "ops.h"

namespace fused_backprop::cpu {
namespace {

constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
// Bytes of one panel's working set that should stay in (a share of) L2.
constexpr int64_t kPanelBytes = 256 * 1024;
constexpr int64_t kL2Bytes = 1024 * 1024;
// Rows per chunk when W outgrows L2 (forward, backward_chunked): big enough for efficient
// multithreaded GEMMs, small enough that the backward's chunk of dz is no (M, N) buffer.
constexpr int64_t kChunkRows = 1024;

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

// Row chunks with multithreaded GEMMs (instead of per-thread panels) when W outgrows L2, where
// panels would stream W once each, and when there are too few rows for panels to beat one
// multithreaded GEMM (measured at M <= 512, 256 <= K, N <= 1024: per-thread panels 1.01-1.15x
// eager's time).
bool use_chunks(int64_t m, int64_t weight_bytes) { return weight_bytes > kL2Bytes || m <= kChunkRows; }

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
  if (weight_bytes > kL2Bytes) return std::max<int64_t>(1, per_thread);
  const int64_t rows = std::min(per_thread, std::max<int64_t>(256, kPanelBytes / std::max<int64_t>(row_bytes, 1)));
  const int64_t panels = ((m + rows - 1) / rows + threads - 1) / threads * threads;
  return std::max<int64_t>(1, (m + panels - 1) / panels);
}

template <typename T, Activation A>
void bias_act_rows(T* out, const T* b, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    map_row(n, []<typename M, typename V>(V z, V bias) { return Act<A>::template forward<V, M>(z + bias); },
            out + i * n, out + i * n, b);
  }
}

template <typename T, Activation A>
void forward_kernel(const T* x, const T* w, const T* b, T* out, int64_t m, int64_t k, int64_t n) {
  if (kVectorized<T> && use_chunks(m, n * k * int64_t(sizeof(T)))) {
    // One multithreaded GEMM per chunk of rows, then the epilogue on all threads while the chunk
    // is still in the last-level cache.
    const SharedB<T> wt({w, k, /*trans=*/true}, m, std::min(m, kChunkRows), k, n);
    for (int64_t c0 = 0; c0 < m; c0 += kChunkRows) {
      const int64_t r = std::min(kChunkRows, m - c0);
      wt.gemm(r, {x + c0 * k, k}, out + c0 * n, n);
      at::parallel_for(0, r, elementwise_grain(n), [&](int64_t i0, int64_t i1) {
        bias_act_rows<T, A>(out + (c0 + i0) * n, b, i1 - i0, n);
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
      wt.gemm(r, {x + r0 * k, k}, out_p, n);
      bias_act_rows<T, A>(out_p, b, r, n);
    }
  });
}

// dz = g where the packed sign mask has its bit, else 0 (relu's derivative from the mask).
// Whole bytes go 8 elements at a time with a constant shift per lane, which the compiler turns
// into SIMD blends; the unaligned head and the tail go one element at a time.
template <typename T>
void dz_from_sign_mask(T* dz, const T* g, const uint8_t* mask, int64_t first, int64_t n) {
  auto one = [&](int64_t j) { dz[j] = (mask[(first + j) >> 3] >> ((first + j) & 7)) & 1 ? g[j] : T(0); };
  int64_t j = 0;
  for (; j < n && (first + j) % 8 != 0; ++j) one(j);
#if defined(CPU_CAPABILITY_AVX512)
  // AVX-512 takes the bits as a lane mask directly: 16 floats per 2 bytes, 8 doubles per byte.
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 16 <= n; j += 16) {
      uint16_t bits;
      std::memcpy(&bits, mask + ((first + j) >> 3), 2);
      _mm512_storeu_ps(dz + j, _mm512_maskz_loadu_ps(bits, g + j));
    }
  } else if constexpr (std::is_same_v<T, double>) {
    for (; j + 8 <= n; j += 8) {
      _mm512_storeu_pd(dz + j, _mm512_maskz_loadu_pd(mask[(first + j) >> 3], g + j));
    }
  }
#endif
  for (; j + 8 <= n; j += 8) {
    const uint8_t bits = mask[(first + j) >> 3];
    for (int i = 0; i < 8; ++i) dz[j + i] = (bits >> i) & 1 ? g[j + i] : T(0);
  }
  for (; j < n; ++j) one(j);
}

// dz for rows [r0, r0 + r) into dz (which holds the pre-activation without bias when both y and
// sign_mask are null): g ⊙ act'(·) from the layer output y, relu's packed sign mask, or z + b.
template <typename T, Activation A>
void form_dz(T* dz, const T* g, const T* y, const uint8_t* sign_mask, const T* b, int64_t r0, int64_t r, int64_t n) {
  for (int64_t i = 0; i < r; ++i) {
    T* dz_i = dz + i * n;
    const T* g_i = g + i * n;
    if (sign_mask != nullptr) {
      dz_from_sign_mask(dz_i, g_i, sign_mask, (r0 + i) * n, n);
    } else if (y != nullptr) {
      map_row(n, []<typename M, typename V>(V go, V out) { return go * Act<A>::template grad_from_output<V, M>(out); },
              dz_i, g_i, y + (r0 + i) * n);
    } else {
      map_row(n, []<typename M, typename V>(V z, V go, V bias) {
                return go * Act<A>::template grad_from_preact<V, M>(z + bias);
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
                      int64_t m, int64_t k, int64_t n, T* dx, T* dw, T* db) {
  const int64_t chunk = std::min(m, kChunkRows);
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
      form_dz<T, A>(dz + i0 * n, g + (c0 + i0) * n, y, sign_mask, b, c0 + i0, i1 - i0, n);
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
                     int64_t m, int64_t k, int64_t n, T* dx, T* dw, T* db) {
  using acc_t = at::opmath_type<T>;
  if (kVectorized<T> && use_chunks(m, n * k * int64_t(sizeof(T)))) {
    return backward_chunked<T, A>(g, x, w, b, y, sign_mask, m, k, n, dx, dw, db);
  }
  const int64_t rows = panel_rows(m, (2 * n + k) * int64_t(sizeof(T)), n * k * int64_t(sizeof(T)));
  const int64_t panels = (m + rows - 1) / rows;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // dW: per-thread accumulators in T for float/double; 16-bit types keep dz and make dW one
  // GEMM with float accumulation instead of summing rounded partials.
  const bool per_thread_dw = dw != nullptr && kVectorized<T>;

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

  at::parallel_for(0, panels, panel_grain(rows, k, n), [&](int64_t p0, int64_t p1) {
    const int64_t tid = at::get_thread_num();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * rows, r = std::min(rows, m - r0);
      T* dz = keep_dz ? dz_store + r0 * n : dz_store + tid * rows * n;
      const T* g_p = g + r0 * n;
      if (recompute) gemm<T>(r, n, k, {x + r0 * k, k}, {w, k, /*trans=*/true}, dz, n);
      form_dz<T, A>(dz, g_p, y, sign_mask, b, r0, r, n);
      if (db != nullptr) add_column_sums(db_part.data() + p * n, dz, r, n);
      if (dx != nullptr) gemm<T>(r, k, n, {dz, n}, {w, k}, dx + r0 * k, k);
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

// The bias as a contiguous tensor; zeros when there is none, so one kernel serves both cases.
at::Tensor bias_or_zeros(const std::optional<at::Tensor>& bias, const at::Tensor& weight) {
  return bias.has_value() ? bias->contiguous() : at::zeros({weight.size(0)}, weight.options());
}

at::Tensor linear_act_fwd(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                          c10::string_view activation) {
  const Activation act = check_forward_args(x_in, weight_in, bias, activation, kDtypes);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous(), b = bias_or_zeros(bias, w);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_act_fwd_cpu", [&] {
    dispatch_activation(act, [&]<Activation A>() {
      forward_kernel<scalar_t, A>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                  b.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), m, k, n);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_bwd(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                             const at::Tensor& weight_in,
                                                             const std::optional<at::Tensor>& bias,
                                                             const std::optional<at::Tensor>& out,
                                                             c10::string_view activation,
                                                             std::array<bool, 3> output_mask) {
  const Activation act =
      check_backward_args(grad_out, x_in, weight_in, bias, out, activation, kDtypes, /*accept_sign_mask=*/true);
  const at::Tensor g = grad_out.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous();
  const at::Tensor b = bias_or_zeros(bias, w);
  const at::Tensor y = out.has_value() ? out->contiguous() : at::Tensor();
  const bool masked = is_sign_mask(out);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const bool want_db = output_mask[2] && bias.has_value();
  at::Tensor dx = output_mask[0] ? at::empty_like(x) : x.new_empty({0});
  at::Tensor dw = output_mask[1] ? at::empty_like(w) : x.new_empty({0});
  at::Tensor db = want_db ? at::empty({n}, x.options()) : x.new_empty({0});
  if (m == 0 || n == 0) {
    // No output element: every gradient is zero (k == 0 needs no care: its GEMMs are empty).
    dx.zero_(), dw.zero_(), db.zero_();
    return {dx, dw, db};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_act_bwd_cpu", [&] {
    dispatch_activation(act, [&]<Activation A>() {
      auto ptr = [](at::Tensor& t, bool on) { return on ? t.mutable_data_ptr<scalar_t>() : nullptr; };
      backward_kernel<scalar_t, A>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                   y.defined() && !masked ? y.const_data_ptr<scalar_t>() : nullptr,
                                   masked ? y.const_data_ptr<uint8_t>() : nullptr, m, k, n,
                                   ptr(dx, output_mask[0]), ptr(dw, output_mask[1]),
                                   ptr(db, want_db));
    });
  });
  return {dx, dw, db};
}

// One pass over y: bit i of byte j is set where element 8j + i is not <= 0 (NaN included).
at::Tensor sign_mask_pack(const at::Tensor& y_in) {
  TORCH_CHECK_TYPE(y_in.is_floating_point(), "fused_backprop: sign_mask_pack: y must be floating point, got ",
                   y_in.scalar_type());
  const at::Tensor y = y_in.contiguous();
  const int64_t numel = y.numel(), bytes = (numel + 7) / 8;
  at::Tensor packed = at::empty({bytes}, y.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "sign_mask_pack", [&] {
    const scalar_t* src = y.const_data_ptr<scalar_t>();
    uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, bytes, at::internal::GRAIN_SIZE / 8, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        uint8_t byte = 0;
        for (int64_t i = 0; i < 8 && j * 8 + i < numel; ++i) {
          byte |= uint8_t(!(src[j * 8 + i] <= scalar_t(0))) << i;
        }
        dst[j] = byte;
      }
    });
  });
  return packed;
}

}  // namespace
}  // namespace fused_backprop::cpu

TORCH_LIBRARY_IMPL(fused_backprop, CPU, m) {
  m.impl("linear_act_fwd", &fused_backprop::cpu::linear_act_fwd);
  m.impl("linear_act_bwd", &fused_backprop::cpu::linear_act_bwd);
  m.impl("sign_mask_pack", &fused_backprop::cpu::sign_mask_pack);
}
