// The Python module fused_backprop._C. Importing it registers the ops (ops.cpp and the kernels);
// it also exposes them as plain functions for LinearActFunction, which does its own autograd, and
// the C++ call path of linear_act (call_path.cpp). These call the ops through the dispatcher below
// the Autograd keys (op_calls.h): a call through torch.ops
// first runs the op's Python autograd kernel (torch.library.register_autograd) and parses its
// arguments against the schema at run time, 3-9 us per call that a small layer feels (64x64x64:
// linear_act_bwd 10.2 us through torch.ops, 6.6 us of it with no rows at all). Every other
// dispatch key still applies (fake tensors, modes, CPU or CUDA kernels); tracing
// (torch.compile) goes through torch.ops.
#include <torch/python.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "call_path.h"
#include "cpu/kernels.h"
#include "op_calls.h"

namespace {

using fused_backprop::op_calls::OptTensor;

// As linear_act_bwd, but a gradient that output_mask (or a missing bias) leaves out is None.
std::tuple<OptTensor, OptTensor, OptTensor> linear_act_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& weight, const OptTensor& bias,
                                                           const OptTensor& out, c10::string_view activation,
                                                           std::array<bool, 3> mask, double negative_slope) {
  auto grads = fused_backprop::op_calls::bwd(grad_out, x, weight, bias, out, activation, mask, negative_slope);
  auto keep = [](at::Tensor& t) { return t.defined() ? OptTensor(std::move(t)) : std::nullopt; };
  return {keep(grads[0]), keep(grads[1]), keep(grads[2])};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("linear_act_fwd", &fused_backprop::op_calls::fwd, py::call_guard<py::gil_scoped_release>());
  m.def("linear_act_fwd_preact", &fused_backprop::op_calls::fwd_preact, py::call_guard<py::gil_scoped_release>());
  m.def("linear_act_bwd", &linear_act_bwd, py::call_guard<py::gil_scoped_release>());
  fused_backprop::add_call_path(m);
  m.def("activations", [] {
    std::vector<std::string> names;
    for (const auto& a : fused_backprop::kActivations) names.emplace_back(a.name);
    return names;
  }, "The activations the compiled kernels have (csrc/activations.def), in its order.");
  m.def("cpu_capability", [] { return std::string(fused_backprop::cpu::kernels().level); },
        "The SIMD level the CPU kernels run.");
  m.def("_tile_gemm", [] { return fused_backprop::cpu::kernels().has_tile_gemm && fused_backprop::cpu::tile_gemm_enabled(); },
        "Whether float GEMMs with an epilogue run csrc/cpu/tile_gemm.h's kernel rather than the BLAS.");
  m.def("_cache_bytes", [] { return std::make_tuple(fused_backprop::cpu::l2_cache_bytes(), fused_backprop::cpu::l3_cache_bytes()); },
        "(L2, L3) cache sizes the CPU kernels size their panels and chunks by.");
}
