// Op schemas (declared once, here) and the argument checks every backend's glue shares.
#include "ops.h"

#include <torch/library.h>

#include <algorithm>

#include <string>

namespace fused_backprop {

std::optional<Activation> find_activation(std::string_view name) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name == kActivations[i].name) return static_cast<Activation>(i);
  }
  return std::nullopt;
}

Activation parse_activation(std::string_view activation) {
  if (const auto act = find_activation(activation)) return *act;
  std::string valid;
  for (const auto& a : kActivations) valid += (valid.empty() ? "'" : ", '") + std::string(a.name) + "'";
  TORCH_CHECK_VALUE(false, "fused_backprop: activation must be one of ", valid, "; got '", std::string(activation),
                    "'");
}

namespace {

std::string dtype_list(at::ArrayRef<at::ScalarType> dtypes) {
  std::string s;
  for (const auto dt : dtypes) {
    if (!s.empty()) s += ", ";
    s += c10::toString(dt);
  }
  return s;
}

void check_like_x(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fused_backprop: ", name, " must be on the same device as input (",
              x.device(), "), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "fused_backprop: ", name,
                   " must have the same dtype as input (", x.scalar_type(), "), got ", t.scalar_type());
}

}  // namespace

Activation check_sign_mask_args(const at::Tensor& y, std::string_view activation) {
  const Activation act = parse_activation(activation);
  TORCH_CHECK_VALUE(info(act).sign_decides, "fused_backprop: sign_mask_pack: activation must be 'relu' or "
                    "'leaky_relu' (whose derivative the sign alone decides), got '", std::string(activation), "'");
  TORCH_CHECK_TYPE(y.is_floating_point(), "fused_backprop: sign_mask_pack: y must be floating point, got ",
                   y.scalar_type());
  return act;
}

bool is_sign_mask(const std::optional<at::Tensor>& out) {
  return out.has_value() && out->scalar_type() == at::kByte;
}

Activation check_forward_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, std::string_view activation,
                              at::ArrayRef<at::ScalarType> dtypes) {
  const Activation act = parse_activation(activation);
  TORCH_CHECK_VALUE(x.dim() == 2, "fused_backprop: input must be 2-D (M, in_features) at the op level, got ",
                    x.dim(), "-D of shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "fused_backprop: weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(std::find(dtypes.begin(), dtypes.end(), x.scalar_type()) != dtypes.end(),
                   "fused_backprop: input dtype must be one of ", dtype_list(dtypes), " on ", x.device().type(),
                   ", got ", x.scalar_type());
  check_like_x(x, weight, "weight");
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "fused_backprop: weight must have in_features = ", x.size(1),
                    " columns to match input of shape ", x.sizes(), ", got weight of shape ", weight.sizes());
  if (bias.has_value()) {
    check_like_x(x, *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "fused_backprop: bias must have shape (",
                      weight.size(0), ",) to match weight of shape ", weight.sizes(), ", got ", bias->sizes());
  }
  return act;
}

namespace {

// out as backward reads it: the layer output or the pre-activation (m, n), or a packed sign mask.
void check_out(const at::Tensor& x, const std::optional<at::Tensor>& out, std::array<int64_t, 2> expected,
               Activation act, std::string_view activation, double negative_slope, bool accept_sign_mask) {
  if (accept_sign_mask && is_sign_mask(out)) {
    const int64_t bytes = (expected[0] * expected[1] + 7) / 8;
    TORCH_CHECK_VALUE(info(act).sign_decides, "fused_backprop: out may be a packed sign mask (uint8) only for "
                      "activations 'relu' and 'leaky_relu', got '", std::string(activation), "'");
    // With a negative slope, y > 0 for z < 0 too: the sign of y does not give the branch.
    TORCH_CHECK_VALUE(!(act == Activation::LeakyReLU && negative_slope < 0), "fused_backprop: out may not be a "
                      "packed sign mask for activation 'leaky_relu' with negative_slope < 0, got negative_slope = ",
                      negative_slope);
    TORCH_CHECK(out->device() == x.device(), "fused_backprop: out must be on the same device as input (",
                x.device(), "), got ", out->device());
    TORCH_CHECK_VALUE(out->dim() == 1 && out->size(0) == bytes, "fused_backprop: out as a packed sign mask must "
                      "have shape (", bytes, ",) = ceil(M * N / 8) bytes, got ", out->sizes());
  } else if (out.has_value()) {
    check_shaped(x, *out, "out", expected);
  }
}

}  // namespace

void check_shaped(const at::Tensor& x, const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  check_like_x(x, t, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, "fused_backprop: ", name, " must have shape ", shape, ", got ", t.sizes());
}

Activation check_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& out, std::string_view activation,
                               double negative_slope, at::ArrayRef<at::ScalarType> dtypes, bool accept_sign_mask) {
  const Activation act = check_forward_args(x, weight, bias, activation, dtypes);
  const std::array<int64_t, 2> expected{x.size(0), weight.size(0)};
  check_shaped(x, grad_out, "grad_out", expected);
  check_out(x, out, expected, act, activation, negative_slope, accept_sign_mask);
  return act;
}

void check_tangents(const at::Tensor& x, const at::Tensor& weight, const Tangents& tangents) {
  const std::array<int64_t, 1> n{weight.size(0)};
  const std::array<at::IntArrayRef, 3> shapes{x.sizes(), weight.sizes(), at::IntArrayRef(n)};
  for (int i = 0; i < 3; ++i) {
    if (tangents.t[i].has_value()) check_shaped(x, *tangents.t[i], tangents.names[i], shapes[i]);
  }
}

Activation check_jvp_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const Tangents& tangents, const std::optional<at::Tensor>& out, std::string_view activation,
                          double negative_slope, at::ArrayRef<at::ScalarType> dtypes, bool accept_sign_mask) {
  const Activation act = check_forward_args(x, weight, bias, activation, dtypes);
  check_out(x, out, {x.size(0), weight.size(0)}, act, activation, negative_slope, accept_sign_mask);
  check_tangents(x, weight, tangents);
  return act;
}

}  // namespace fused_backprop

TORCH_LIBRARY(fused_backprop, m) {
  // negative_slope: leaky relu's parameter (the other activations ignore it), as F.leaky_relu's.
  m.def("linear_act_fwd(Tensor x, Tensor weight, Tensor? bias, str activation, float negative_slope=0.01) -> Tensor");
  // The forward that also returns the pre-activation z (what backward takes as `out` for the
  // activations whose derivative is not a function of the output: gelu, gelu_tanh, silu).
  m.def("linear_act_fwd_preact(Tensor x, Tensor weight, Tensor? bias, str activation, float negative_slope=0.01) "
        "-> (Tensor, Tensor)");
  // out: the layer output (saved = Output in activations.def), the pre-activation (Preact; also
  // for leaky relu with negative_slope < 0, whose output does not tell the branch; its formula
  // reads either), a packed sign mask (relu, leaky relu), or None to recompute the pre-activation.
  m.def(
      "linear_act_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? out, str activation, "
      "bool[3] output_mask, float negative_slope=0.01) -> (Tensor, Tensor, Tensor)");
  // The packed 1-bit sign mask of y for relu or leaky relu (see check_backward_args): uint8,
  // ceil(numel / 8) bytes.
  m.def("sign_mask_pack(Tensor y, str activation=\"relu\") -> Tensor");
  // Forward-mode derivative: act'(z) ⊙ (x_t · Wᵀ + x · W_tᵀ + b_t), a missing tangent being zero;
  // out as linear_act_bwd's.
  m.def("linear_act_jvp(Tensor x, Tensor weight, Tensor? bias, Tensor? x_t, Tensor? weight_t, Tensor? bias_t, "
        "Tensor? out, str activation, float negative_slope=0.01) -> Tensor");
  // The backward of linear_act_bwd: the gradients reaching (grad_out, x, weight, bias) from the
  // cotangents (ggx, ggw, ggb) of its (dx, dw, db); a missing cotangent is zero, an output_mask
  // entry False gives an empty tensor.
  m.def("linear_act_bwd_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? out, Tensor? ggx, "
        "Tensor? ggw, Tensor? ggb, str activation, bool[4] output_mask, float negative_slope=0.01) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
