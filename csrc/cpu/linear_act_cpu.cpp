// The CPU kernels' torch glue, compiled once: argument checks, contiguous inputs, outputs, and
// the call into the kernels of the SIMD level chosen at run time (kernels.h, kernels_impl.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cpu/kernels.h"
#include "ops.h"

namespace fused_backprop::cpu {
namespace {

constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};

// The bias as a contiguous tensor; zeros when there is none, so one kernel serves both cases.
at::Tensor bias_or_zeros(const std::optional<at::Tensor>& bias, const at::Tensor& weight) {
  return bias.has_value() ? bias->contiguous() : at::zeros({weight.size(0)}, weight.options());
}

// out = act(x · Wᵀ + b), and the pre-activation into `preact` when it is defined.
at::Tensor forward_into(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                        c10::string_view activation, double negative_slope, bool keep_preact, at::Tensor* preact) {
  const Activation act = check_forward_args(x_in, weight_in, bias, activation, kDtypes);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous(), b = bias_or_zeros(bias, w);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (keep_preact) *preact = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  kernels().forward({x.scalar_type(), act, negative_slope, x.const_data_ptr(), w.const_data_ptr(), b.const_data_ptr(),
                     out.mutable_data_ptr(), keep_preact ? preact->mutable_data_ptr() : nullptr, m, k, n});
  return out;
}

at::Tensor linear_act_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          c10::string_view activation, double negative_slope) {
  return forward_into(x, weight, bias, activation, negative_slope, false, nullptr);
}

std::tuple<at::Tensor, at::Tensor> linear_act_fwd_preact(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         c10::string_view activation, double negative_slope) {
  at::Tensor preact;
  at::Tensor out = forward_into(x, weight, bias, activation, negative_slope, true, &preact);
  return {out, preact};
}

// What the backward-like ops read of `out`: the layer output or pre-activation, or the sign mask
// (both pointers null: recompute).
struct KeptOut {
  at::Tensor t;
  bool mask;
  const void* values() const { return t.defined() && !mask ? t.const_data_ptr() : nullptr; }
  const uint8_t* sign_mask() const { return mask ? t.const_data_ptr<uint8_t>() : nullptr; }
};

KeptOut kept_out(const std::optional<at::Tensor>& out) {
  return {out.has_value() ? out->contiguous() : at::Tensor(), is_sign_mask(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_bwd(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                             const at::Tensor& weight_in,
                                                             const std::optional<at::Tensor>& bias,
                                                             const std::optional<at::Tensor>& out,
                                                             c10::string_view activation,
                                                             std::array<bool, 3> output_mask, double negative_slope) {
  const Activation act = check_backward_args(grad_out, x_in, weight_in, bias, out, activation, negative_slope, kDtypes,
                                             /*accept_sign_mask=*/true);
  const at::Tensor g = grad_out.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous();
  const at::Tensor b = bias_or_zeros(bias, w);
  const KeptOut y = kept_out(out);
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
  auto ptr = [](at::Tensor& t, bool on) { return on ? t.mutable_data_ptr() : nullptr; };
  kernels().backward({x.scalar_type(), act, negative_slope, g.const_data_ptr(), x.const_data_ptr(), w.const_data_ptr(),
                      b.const_data_ptr(), y.values(), y.sign_mask(), m, k, n, ptr(dx, output_mask[0]),
                      ptr(dw, output_mask[1]), ptr(db, want_db)});
  return {dx, dw, db};
}


at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor linear_act_jvp(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& weight_t,
                          const std::optional<at::Tensor>& bias_t, const std::optional<at::Tensor>& out,
                          c10::string_view activation, double negative_slope) {
  const Activation act = check_jvp_args(x_in, weight_in, bias, {{x_t, weight_t, bias_t}, {"x_t", "weight_t", "bias_t"}},
                                        out, activation, negative_slope, kDtypes, /*accept_sign_mask=*/true);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous(), b = bias_or_zeros(bias, w);
  const at::Tensor xt = contiguous_or_undefined(x_t), wt = contiguous_or_undefined(weight_t);
  const at::Tensor bt = contiguous_or_undefined(bias_t);
  const KeptOut y = kept_out(out);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor result = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return result;
  kernels().tangent({x.scalar_type(), act, negative_slope, x.const_data_ptr(), w.const_data_ptr(), b.const_data_ptr(),
                     data_or_null(xt), data_or_null(wt), data_or_null(bt), y.values(), y.sign_mask(), m, k, n,
                     result.mutable_data_ptr()});
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_act_bwd_bwd(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& ggx,
    const std::optional<at::Tensor>& ggw, const std::optional<at::Tensor>& ggb, c10::string_view activation,
    std::array<bool, 4> output_mask, double negative_slope) {
  const Activation act = check_backward_args(grad_out, x_in, weight_in, bias, out, activation, negative_slope, kDtypes,
                                             /*accept_sign_mask=*/true);
  check_tangents(x_in, weight_in, {{ggx, ggw, ggb}, {"ggx", "ggw", "ggb"}});
  const at::Tensor g = grad_out.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous();
  const at::Tensor b = bias_or_zeros(bias, w);
  const at::Tensor c_x = contiguous_or_undefined(ggx), c_w = contiguous_or_undefined(ggw);
  const at::Tensor c_b = contiguous_or_undefined(ggb);
  const KeptOut y = kept_out(out);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  output_mask[3] = output_mask[3] && bias.has_value();
  auto make = [&](bool on, at::IntArrayRef shape) { return on ? at::empty(shape, x.options()) : x.new_empty({0}); };
  at::Tensor g_g = make(output_mask[0], {m, n}), g_x = make(output_mask[1], {m, k});
  at::Tensor g_w = make(output_mask[2], {n, k}), g_b = make(output_mask[3], {n});
  if (m == 0 || n == 0) {
    g_g.zero_(), g_x.zero_(), g_w.zero_(), g_b.zero_();
    return {g_g, g_x, g_w, g_b};
  }
  auto ptr = [](at::Tensor& t, bool on) { return on ? t.mutable_data_ptr() : nullptr; };
  kernels().bwd_bwd({x.scalar_type(), act, negative_slope, g.const_data_ptr(), x.const_data_ptr(), w.const_data_ptr(),
                     b.const_data_ptr(), y.values(), y.sign_mask(), data_or_null(c_x), data_or_null(c_w),
                     data_or_null(c_b), m, k, n, ptr(g_g, output_mask[0]), ptr(g_x, output_mask[1]),
                     ptr(g_w, output_mask[2]), ptr(g_b, output_mask[3])});
  return {g_g, g_x, g_w, g_b};
}

// One pass over y: bit i of byte j is Act<A>::mask_bit of element 8j + i.
at::Tensor sign_mask_pack(const at::Tensor& y_in, c10::string_view activation) {
  const Activation act = check_sign_mask_args(y_in, activation);
  const at::Tensor y = y_in.contiguous();
  const int64_t numel = y.numel(), bytes = (numel + 7) / 8;
  at::Tensor packed = at::empty({bytes}, y.options().dtype(at::kByte));
  kernels().sign_mask_pack(y.scalar_type(), act, y.const_data_ptr(), numel, packed.mutable_data_ptr<uint8_t>());
  return packed;
}

}  // namespace
}  // namespace fused_backprop::cpu

TORCH_LIBRARY_IMPL(fused_backprop, CPU, m) {
  m.impl("linear_act_fwd", &fused_backprop::cpu::linear_act_fwd);
  m.impl("linear_act_fwd_preact", &fused_backprop::cpu::linear_act_fwd_preact);
  m.impl("linear_act_bwd", &fused_backprop::cpu::linear_act_bwd);
  m.impl("sign_mask_pack", &fused_backprop::cpu::sign_mask_pack);
  m.impl("linear_act_jvp", &fused_backprop::cpu::linear_act_jvp);
  m.impl("linear_act_bwd_bwd", &fused_backprop::cpu::linear_act_bwd_bwd);
}
