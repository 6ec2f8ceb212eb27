// Shared pieces of the registered ops: argument checks (the one place for them on the C++ side)
// and the activation parsing used by every backend's torch glue.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "activation.h"

namespace fused_backprop {

// The activation of activations.def called `name`, or nullopt.
std::optional<Activation> find_activation(std::string_view name);

// Parses an activation name of activations.def; anything else is an error that names the argument
// and lists the valid names.
Activation parse_activation(std::string_view activation);

// Checks linear_act_fwd's arguments: x (M, K), weight (N, K), bias (N) or None, one floating
// dtype from `dtypes`, one device. Returns the parsed activation.
Activation check_forward_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, std::string_view activation,
                              at::ArrayRef<at::ScalarType> dtypes);

// Checks linear_act_bwd's arguments: the forward's, plus grad_out (M, N) and out (M, N) or None.
// out holds the layer output or the pre-activation, per the activation's `saved` kind. With
// accept_sign_mask, out may instead be relu's or leaky relu's packed sign mask: uint8 of
// ceil(M * N / 8) bytes, bit i of byte j = Act<A>::mask_bit of element 8j + i of the output
// (fused_backprop/sign_mask.py).
Activation check_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& out, std::string_view activation,
                               double negative_slope, at::ArrayRef<at::ScalarType> dtypes,
                               bool accept_sign_mask = false);

// t has x's device and dtype and the given shape (name: the argument's name in messages).
void check_shaped(const at::Tensor& x, const at::Tensor& t, const char* name, at::IntArrayRef shape);

// The tangents (or cotangents) of x, weight and bias, each optional, and their argument names.
struct Tangents {
  std::array<std::optional<at::Tensor>, 3> t;
  std::array<const char*, 3> names;
};

// Each tangent given is shaped like x, weight, bias respectively (and on x's device, of its dtype).
void check_tangents(const at::Tensor& x, const at::Tensor& weight, const Tangents& tangents);

// Checks linear_act_jvp's arguments: the forward's, out as backward's, and the tangents.
Activation check_jvp_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const Tangents& tangents, const std::optional<at::Tensor>& out, std::string_view activation,
                          double negative_slope, at::ArrayRef<at::ScalarType> dtypes, bool accept_sign_mask);

// Checks sign_mask_pack's arguments: a floating y, an activation whose sign decides its derivative.
Activation check_sign_mask_args(const at::Tensor& y, std::string_view activation);

// Whether linear_act_bwd's out is a packed sign mask rather than the layer output.
bool is_sign_mask(const std::optional<at::Tensor>& out);

}  // namespace fused_backprop
