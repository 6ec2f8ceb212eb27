// The Python module fused_backprop._C. Importing it registers the ops (ops.cpp and the kernels);
// it also exposes them as plain functions for LinearActFunction, which does its own autograd.
// These call the ops through the dispatcher below the Autograd keys: a call through torch.ops
// first runs the op's Python autograd kernel (torch.library.register_autograd) and parses its
// arguments against the schema at run time, 3-9 us per call that a small layer feels (64x64x64:
// linear_act_bwd 10.2 us through torch.ops, 6.6 us of it with no rows at all). Every other
// dispatch key still applies (fake tensors, modes, CPU or CUDA kernels); tracing
// (torch.compile) goes through torch.ops.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/python.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor linear_act_fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          c10::string_view activation, double negative_slope) {
  static const auto fwd =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view, double)>(
          "fused_backprop::linear_act_fwd");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fwd.call(x, weight, bias, activation, negative_slope);
}

std::tuple<at::Tensor, at::Tensor> linear_act_fwd_preact(const at::Tensor& x, const at::Tensor& weight,
                                                         const OptTensor& bias, c10::string_view activation,
                                                         double negative_slope) {
  static const auto fwd = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                                c10::string_view, double)>(
      "fused_backprop::linear_act_fwd_preact");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fwd.call(x, weight, bias, activation, negative_slope);
}

// As linear_act_bwd, but a gradient that output_mask (or a missing bias) leaves out is None.
std::tuple<OptTensor, OptTensor, OptTensor> linear_act_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& weight, const OptTensor& bias,
                                                           const OptTensor& out, c10::string_view activation,
                                                           std::array<bool, 3> mask, double negative_slope) {
  static const auto bwd =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const OptTensor&, const OptTensor&, c10::string_view,
                                                        std::array<bool, 3>, double)>("fused_backprop::linear_act_bwd");
  mask[2] = mask[2] && bias.has_value();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [dx, dw, db] = bwd.call(grad_out, x, weight, bias, out, activation, mask, negative_slope);
  auto keep = [](at::Tensor& t, bool wanted) { return wanted ? OptTensor(std::move(t)) : std::nullopt; };
  return {keep(dx, mask[0]), keep(dw, mask[1]), keep(db, mask[2])};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("linear_act_fwd", &linear_act_fwd, py::call_guard<py::gil_scoped_release>());
  m.def("linear_act_fwd_preact", &linear_act_fwd_preact, py::call_guard<py::gil_scoped_release>());
  m.def("linear_act_bwd", &linear_act_bwd, py::call_guard<py::gil_scoped_release>());
  m.def("activations", [] {
    std::vector<std::string> names;
    for (const auto& a : fused_backprop::kActivations) names.emplace_back(a.name);
    return names;
  }, "The activations the compiled kernels have (csrc/activations.def), in its order.");
  m.def("cpu_capability", [] { return std::string(fused_backprop::cpu::kernels().level); },
        "The SIMD level the CPU kernels run.");
  m.def("_tile_gemm", [] { return fused_backprop::cpu::tile_gemm_enabled() && std::string(fused_backprop::cpu::kernels().level) != "DEFAULT"; },
        "Whether float GEMMs with an epilogue run csrc/cpu/tile_gemm.h's kernel rather than the BLAS.");
  m.def("_cache_bytes", [] { return std::make_tuple(fused_backprop::cpu::l2_cache_bytes(), fused_backprop::cpu::l3_cache_bytes()); },
        "(L2, L3) cache sizes the CPU kernels size their panels and chunks by.");
}
