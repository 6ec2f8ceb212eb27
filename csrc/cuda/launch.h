// Torch-free launch API of the CUDA kernels: plain pointers, sizes and leading dimensions.
//
// The torch glue (linear_act_cuda.cu) includes only this header; the kernels themselves live in
// kernels.cuh and are instantiated once per element type in kernels_<dtype>.cu, so nvcc compiles
// them without the torch headers and in parallel. The host-execution harness
// (tests/cuda_harness) includes kernels.cuh directly and runs these same launchers on the CPU.
//
// Layout: every matrix is row-major with a unit column stride and a leading dimension (row
// stride) ld >= its column count. The glue makes any other layout contiguous first.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../activation.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#elif !defined(FB_CUDA_HOST_HARNESS)
#error "csrc/cuda/launch.h needs nvcc, or the host-execution harness (tests/cuda_harness/cuda_host.h) included first"
#endif

namespace fused_backprop::cuda {

// Called after every kernel launch (the glue passes C10_CUDA_KERNEL_LAUNCH_CHECK).
using LaunchCheck = void (*)();

// The type the kernels compute in: float for the 16-bit types, else the element type itself. The
// activation's parameter `a` (leaky relu's negative slope; the others ignore it) is given in it.
template <typename T>
struct AccType {
  using type = T;
};
template <>
struct AccType<__half> {
  using type = float;
};
template <>
struct AccType<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// y = act(x W^T + b): x (M, K), weight (N, K), bias (N) or nullptr, out (M, N); preact (M, N),
// unless nullptr, gets the pre-activation z = x W^T + b (rounded to T; out is computed from the
// unrounded z either way, so it does not depend on whether preact is stored).
template <typename T>
struct FwdProblem {
  const T* x;
  int64_t ldx;
  const T* w;
  int64_t ldw;
  const T* bias;  // may be nullptr
  T* out;
  int64_t ldo;
  T* preact;  // may be nullptr
  int64_t ldp;
  int64_t M, N, K;
  void* workspace;  // fwd_workspace_bytes<T>(M, N, K) bytes, 256-byte aligned (split-K partial sums)
  acc_t<T> a;       // the activation's parameter
};

// Backward of y = act(x W^T + b).
//   saved != nullptr: what the forward kept, as kSaved<A> says (activations.def): the layer output
//   y (relu, sigmoid, tanh, leaky relu; for relu and leaky relu a 0/1 mask of y > 0 serves too) or
//   the pre-activation z (gelu, gelu_tanh, silu). dZ = dY * grad_from_saved<A>(saved) is formed
//   on the fly inside the GEMM tile loaders.
//   saved == nullptr (recompute): Z = x W^T + b is recomputed by a GEMM whose epilogue writes
//   dZ = dY * act'(Z) to the workspace; the GEMMs below then read that dZ.
// dx (M, K), dw (N, K), db (N): nullptr when not requested. db is reduced deterministically:
// per-block column partials (fixed row blocks; with dw, by the dW GEMM from the dZ tiles it
// loads anyway) then a second, fixed-order stage; no atomics.
template <typename T>
struct BwdProblem {
  const T* dy;
  int64_t lddy;
  const T* x;
  int64_t ldx;
  const T* w;
  int64_t ldw;
  const T* bias;   // used only under recompute; may be nullptr
  const T* saved;  // y or z (see above), or nullptr = recompute
  int64_t lds;
  T* dx;
  int64_t lddx;
  T* dw;
  int64_t lddw;
  T* db;
  int64_t M, N, K;
  void* workspace;  // bwd_workspace_bytes<T>(...) bytes, 256-byte aligned
  acc_t<T> a;       // the activation's parameter
};

// Bytes of scratch the backward needs (0 when none): dZ (M x N, T) under recompute, the db
// partials (row blocks x N, accumulation type) when db is requested, and the split-K slices of
// the dX / dW GEMMs when their outputs are too small to fill the GPU.
template <typename T>
size_t bwd_workspace_bytes(int64_t M, int64_t N, int64_t K, bool recompute, bool need_dx, bool need_dw,
                           bool need_db);

// Bytes of scratch the forward needs (0 when none): the split-K partial sums when the output is
// too small to fill the GPU.
template <typename T>
size_t fwd_workspace_bytes(int64_t M, int64_t N, int64_t K);

template <typename T, Activation A>
void launch_forward(const FwdProblem<T>& p, cudaStream_t stream, LaunchCheck check);

template <typename T, Activation A>
void launch_backward(const BwdProblem<T>& p, cudaStream_t stream, LaunchCheck check);

}  // namespace fused_backprop::cuda
