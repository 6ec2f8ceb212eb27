// Torch glue of the CUDA backend: argument checks (shared with every backend, csrc/ops.h),
// allocation, layout, dtype and activation dispatch, then the torch-free launchers of
// launch.h (kernels in kernels.cuh, instantiated per dtype in kernels_<dtype>.cu).
// Every launch runs on the current stream of the input's device under a CUDAGuard and is
// followed by C10_CUDA_KERNEL_LAUNCH_CHECK.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "../ops.h"
#include "launch.h"

namespace fused_backprop {
namespace {

constexpr std::array<at::ScalarType, 4> kCudaDtypes{at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

void launch_check() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

// The kernels take row-major matrices with a unit column stride and a leading dimension: such a
// tensor (a row slice, a padded buffer) is used in place, anything else is made contiguous.
at::Tensor as_rowmajor(const at::Tensor& t) {
  const bool unit_cols = t.size(1) <= 1 || t.stride(1) == 1;
  const bool rows_ok = t.size(0) <= 1 || t.stride(0) >= std::max<int64_t>(t.size(1), 1);
  return unit_cols && rows_ok ? t : t.contiguous();
}

int64_t leading_dim(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0);
}

template <typename CT>
const CT* cptr(const at::Tensor& t) {
  return static_cast<const CT*>(t.const_data_ptr());
}
template <typename CT>
CT* mptr(at::Tensor& t) {
  return static_cast<CT*>(t.mutable_data_ptr());
}

// out = act(x W^T + b); with keep_preact, *preact = the pre-activation x W^T + b as well.
at::Tensor forward_into(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        std::string_view activation, double negative_slope, bool keep_preact, at::Tensor* preact) {
  const Activation act = check_forward_args(x, weight, bias, activation, kCudaDtypes);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (keep_preact) *preact = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;  // nothing to launch
  const at::Tensor xr = as_rowmajor(x), wr = as_rowmajor(weight);
  const at::Tensor br = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_fwd_cuda", [&] {
    using CT = typename CudaType<scalar_t>::type;
    const size_t ws_bytes = cuda::fwd_workspace_bytes<CT>(M, N, K);
    at::Tensor ws;  // split-K scratch from the caching allocator (stream-ordered, 256-byte aligned)
    if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    const cuda::FwdProblem<CT> p{cptr<CT>(xr),
                                 leading_dim(xr),
                                 cptr<CT>(wr),
                                 leading_dim(wr),
                                 br.defined() ? cptr<CT>(br) : nullptr,
                                 mptr<CT>(out),
                                 N,
                                 keep_preact ? mptr<CT>(*preact) : nullptr,
                                 N,
                                 M,
                                 N,
                                 K,
                                 ws.defined() ? ws.mutable_data_ptr() : nullptr,
                                 static_cast<cuda::acc_t<CT>>(negative_slope)};
    dispatch_activation(act, [&]<Activation A>() { cuda::launch_forward<CT, A>(p, stream, launch_check); });
  });
  return out;
}

at::Tensor linear_act_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               std::string_view activation, double negative_slope) {
  return forward_into(x, weight, bias, activation, negative_slope, false, nullptr);
}

std::tuple<at::Tensor, at::Tensor> linear_act_fwd_preact_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              std::string_view activation, double negative_slope) {
  at::Tensor preact;
  at::Tensor out = forward_into(x, weight, bias, activation, negative_slope, true, &preact);
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& out, std::string_view activation, std::array<bool, 3> output_mask,
    double negative_slope) {
  // out: the layer output y or the pre-activation z, as the activation's kSaved says, or None
  // (recompute). No packed sign masks here: the Python layer unpacks them to 0/1 values of y.
  const Activation act =
      check_backward_args(grad_out, x, weight, bias, out, activation, negative_slope, kCudaDtypes);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool want_dx = output_mask[0], want_dw = output_mask[1], want_db = output_mask[2] && bias.has_value();
  at::Tensor dx = want_dx ? at::empty({M, K}, x.options()) : x.new_empty({0});
  at::Tensor dw = want_dw ? at::empty({N, K}, x.options()) : x.new_empty({0});
  at::Tensor db = want_db ? at::empty({N}, x.options()) : x.new_empty({0});
  if (M == 0 || N == 0) {
    // no rows: dx is empty, dw and db are sums over nothing; no columns: dx = dZ . W = 0
    if (want_dx) dx.zero_();
    if (want_dw) dw.zero_();
    if (want_db) db.zero_();
    return {dx, dw, db};
  }
  if (!want_dx && !want_dw && !want_db) return {dx, dw, db};
  const bool recompute = !out.has_value();
  const at::Tensor gr = as_rowmajor(grad_out), xr = as_rowmajor(x), wr = as_rowmajor(weight);
  const at::Tensor sr = recompute ? at::Tensor() : as_rowmajor(*out);
  const at::Tensor br = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_bwd_cuda", [&] {
    using CT = typename CudaType<scalar_t>::type;
    const size_t ws_bytes = cuda::bwd_workspace_bytes<CT>(M, N, K, recompute, want_dx, want_dw, want_db);
    at::Tensor ws;  // scratch from the caching allocator (stream-ordered, 256-byte aligned)
    if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    const cuda::BwdProblem<CT> p{cptr<CT>(gr),
                                 leading_dim(gr),
                                 cptr<CT>(xr),
                                 leading_dim(xr),
                                 cptr<CT>(wr),
                                 leading_dim(wr),
                                 br.defined() ? cptr<CT>(br) : nullptr,
                                 recompute ? nullptr : cptr<CT>(sr),
                                 recompute ? N : leading_dim(sr),
                                 want_dx ? mptr<CT>(dx) : nullptr,
                                 K,
                                 want_dw ? mptr<CT>(dw) : nullptr,
                                 K,
                                 want_db ? mptr<CT>(db) : nullptr,
                                 M,
                                 N,
                                 K,
                                 ws.defined() ? ws.mutable_data_ptr() : nullptr,
                                 static_cast<cuda::acc_t<CT>>(negative_slope)};
    dispatch_activation(act, [&]<Activation A>() { cuda::launch_backward<CT, A>(p, stream, launch_check); });
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace fused_backprop

TORCH_LIBRARY_IMPL(fused_backprop, CUDA, m) {
  m.impl("linear_act_fwd", &fused_backprop::linear_act_fwd_cuda);
  m.impl("linear_act_fwd_preact", &fused_backprop::linear_act_fwd_preact_cuda);
  m.impl("linear_act_bwd", &fused_backprop::linear_act_bwd_cuda);
}
