// The registered ops called from C++ through the dispatcher below the Autograd keys (the caller
// owns autograd): python.cpp's plain bindings and call_path.cpp's autograd node use them. Every
// other dispatch key still applies (fake tensors, modes, the CPU or CUDA kernel).
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

namespace fused_backprop::op_calls {

using OptTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::Tensor fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                      c10::string_view activation, double negative_slope) {
  static const auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view,
                                      double)>("fused_backprop::linear_act_fwd");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return h.call(x, weight, bias, activation, negative_slope);
}

inline std::tuple<at::Tensor, at::Tensor> fwd_preact(const at::Tensor& x, const at::Tensor& weight,
                                                     const OptTensor& bias, c10::string_view activation,
                                                     double negative_slope) {
  static const auto h = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                              c10::string_view, double)>(
      "fused_backprop::linear_act_fwd_preact");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return h.call(x, weight, bias, activation, negative_slope);
}

// linear_act_bwd; a gradient that `mask` (or a missing bias) leaves out is an undefined tensor.
inline std::array<at::Tensor, 3> bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                     const OptTensor& bias, const OptTensor& out, c10::string_view activation,
                                     std::array<bool, 3> mask, double negative_slope) {
  static const auto h =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const OptTensor&, const OptTensor&, c10::string_view,
                                                        std::array<bool, 3>, double)>("fused_backprop::linear_act_bwd");
  mask[2] = mask[2] && bias.has_value();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [dx, dw, db] = h.call(grad_out, x, weight, bias, out, activation, mask, negative_slope);
  return {mask[0] ? dx : at::Tensor(), mask[1] ? dw : at::Tensor(), mask[2] ? db : at::Tensor()};
}

inline at::Tensor sign_mask_pack(const at::Tensor& y, c10::string_view activation) {
  static const auto h = op<at::Tensor(const at::Tensor&, c10::string_view)>("fused_backprop::sign_mask_pack");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return h.call(y, activation);
}

}  // namespace fused_backprop::op_calls
