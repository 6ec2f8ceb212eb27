// The C++ call path of fused_backprop.linear_act: for a plain call (CPU tensors, backend "auto" or
// "cpu", no torch.func transform, dispatch or torch-function mode, JIT tracing or Python tensor
// subclass; forward-AD levels and torch.compile are ruled out in functional.py) it does what the
// Python path does, autocast, the forward kernel, what backward keeps, in one C++ call, and
// records autograd with LinearActNode, a C++ node (the role torchvision's roi_align autograd
// kernel plays) instead of EagerLinearActFunction: the Python path costs about 8 us a call, far
// more than a small layer's kernel. _C.linear_act returns None for every call it does not take,
// valid or not, and linear_act then runs the Python path, which raises the errors: the argument
// checks and their messages live in _checks.py alone.
//
// The node's backward runs the linear_act_bwd kernel directly; when a graph is recorded during
// backward (create_graph=True: double backward) it calls autograd.linear_act_backward, the
// differentiable backward the Python path uses too.
#include "call_path.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <string_view>

#include "activation.h"
#include "op_calls.h"
#include "ops.h"

namespace fused_backprop {
namespace {

namespace ag = torch::autograd;
using op_calls::OptTensor;
using c10::DispatchKey;

// Set by _init_call_path: autograd.linear_act_backward and the "cpu" backend it is called with.
// Never freed (they live as long as the module).
PyObject* g_backward = nullptr;
PyObject* g_cpu_backend = nullptr;

// What backward keeps of the forward, as autograd.linear_act_forward decides it.
bool saves_output(Activation act, double negative_slope) {
  return info(act).saved == Saved::Output && !(act == Activation::LeakyReLU && negative_slope < 0);
}

// The backward of one call: (dx, dw, db) from grad_out.
struct LinearActNode : ag::Node {
  std::string name() const override { return "FusedLinearActBackward"; }

  ag::variable_list apply(ag::variable_list&& grads) override {
    const at::Tensor& grad_out = grads[0];
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   has_bias && task_should_compute_output(2)};
    if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2])) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor x = x_.unpack(), w = weight_.unpack();
    const OptTensor b = has_bias ? OptTensor(bias_.unpack()) : std::nullopt;
    const at::Tensor k = kept_.unpack(getptr());
    const OptTensor kept = k.defined() ? OptTensor(k) : std::nullopt;
    if (!at::GradMode::is_enabled()) {
      auto g = op_calls::bwd(grad_out, x, w, b, kept, activation, mask, negative_slope);
      return {g[0], g[1], g[2]};
    }
    pybind11::gil_scoped_acquire gil;
    auto tensor_or_none = [](const OptTensor& t) {
      return t.has_value() ? pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(*t)) : pybind11::none();
    };
    const pybind11::tuple r = pybind11::handle(g_backward)(
        tensor_or_none(grad_out), tensor_or_none(x), tensor_or_none(w), tensor_or_none(b), tensor_or_none(kept),
        activation, pybind11::make_tuple(mask[0], mask[1], mask[2]), negative_slope, pybind11::handle(g_cpu_backend));
    ag::variable_list out(3);
    for (int i = 0; i < 3; ++i) {
      if (!r[i].is_none()) out[i] = THPVariable_Unpack(r[i].ptr());
    }
    return out;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data(), weight_.reset_data(), bias_.reset_data(), kept_.reset_data();
  }

  std::string activation;
  double negative_slope = 0;
  bool has_bias = false;
  ag::SavedVariable x_, weight_, bias_, kept_;
};

// The keys of a plain dense CPU tensor, and of the thread-local state of a call that no
// transform, mode or tracer watches.
constexpr c10::DispatchKeySet kPlainCpu{DispatchKey::CPU, DispatchKey::ADInplaceOrView, DispatchKey::AutogradCPU,
                                        DispatchKey::AutocastCPU};
constexpr c10::DispatchKeySet kWatched{DispatchKey::Python, DispatchKey::PythonTLSSnapshot,
                                       DispatchKey::FuncTorchDynamicLayerFrontMode,
                                       DispatchKey::FuncTorchDynamicLayerBackMode, DispatchKey::Functionalize};

bool plain_context() {
  return (c10::impl::tls_local_dispatch_key_set().included_ & kWatched).empty() &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set() && !at::impl::torch_function_mode_enabled() &&
         !torch::jit::tracer::isTracing();
}

// A torch.Tensor or nn.Parameter (no subclass) whose keys are those of a plain CPU tensor.
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return kPlainCpu.isSupersetOf(t.key_set()) ? &t : nullptr;
}

std::optional<std::string_view> str(PyObject* obj) {
  Py_ssize_t size = 0;
  const char* s = PyUnicode_Check(obj) ? PyUnicode_AsUTF8AndSize(obj, &size) : nullptr;
  if (s == nullptr) return std::nullopt;
  return std::string_view(s, size);
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// check_linear_args' conditions, without the messages: whether the Python path would accept the
// arguments (then the result is the same), after autocast's casts.
bool valid(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias) {
  return weight.dim() == 2 && input.dim() >= 1 && input.size(-1) == weight.size(1) &&
         (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0))) &&
         is_float_dtype(input.scalar_type()) && weight.scalar_type() == input.scalar_type() &&
         (!bias.has_value() || bias->scalar_type() == input.scalar_type());
}

// linear_act on valid arguments, autocast applied: the kernel, autograd, the leading dims restored.
at::Tensor linear_act(at::Tensor input, at::Tensor weight, OptTensor bias, Activation act, std::string_view name,
                      double negative_slope, bool recompute) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const bool flat = input.dim() == 2;
  const at::Tensor x =
      flat ? input : input.reshape({c10::multiply_integers(input.sizes().slice(0, input.dim() - 1)), k});
  const bool grad = ag::compute_requires_grad(x, weight, bias);
  at::Tensor out, kept;
  bool keep_out = false;
  const c10::string_view act_name(name.data(), name.size());
  if (saves_output(act, negative_slope)) {
    out = op_calls::fwd(x, weight, bias, act_name, negative_slope);
    keep_out = grad && !recompute;
    if (grad && recompute && info(act).sign_decides) kept = op_calls::sign_mask_pack(out, act_name);
  } else if (recompute || !grad) {
    out = op_calls::fwd(x, weight, bias, act_name, negative_slope);
  } else {
    std::tie(out, kept) = op_calls::fwd_preact(x, weight, bias, act_name, negative_slope);
  }
  if (grad) {
    auto node = c10::make_intrusive<LinearActNode>();
    node->set_next_edges(ag::collect_next_edges(x, weight, bias));
    ag::set_history(out, node);
    node->activation = std::string(name);
    node->negative_slope = negative_slope;
    node->has_bias = bias.has_value();
    node->x_ = ag::SavedVariable(x, false);
    node->weight_ = ag::SavedVariable(weight, false);
    if (bias.has_value()) node->bias_ = ag::SavedVariable(*bias, false);
    if (keep_out) {
      node->kept_ = ag::SavedVariable(out, true);
    } else if (kept.defined()) {
      node->kept_ = ag::SavedVariable(kept, false);
    }
  }
  if (flat) return out;
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
  shape.push_back(n);
  return out.reshape(shape);
}

// _C.linear_act(input, weight, bias, activation, negative_slope, recompute, backend): the output,
// or None where the call takes the Python path (see the file comment).
PyObject* linear_act_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "_C.linear_act takes 7 positional arguments");
    return nullptr;
  }
  PyObject* const slope = args[4];
  const bool slope_ok = PyFloat_CheckExact(slope) || PyLong_CheckExact(slope);
  const auto name = str(args[3]), backend = str(args[6]);
  const std::optional<Activation> act = name ? find_activation(*name) : std::nullopt;
  if (g_backward == nullptr || !slope_ok || !PyBool_Check(args[5]) || !act || !backend ||
      (*backend != "auto" && *backend != "cpu") || !plain_context()) {
    Py_RETURN_NONE;
  }
  const at::Tensor* input = plain_tensor(args[0]);
  const at::Tensor* weight = plain_tensor(args[1]);
  const at::Tensor* bias = args[2] == Py_None ? nullptr : plain_tensor(args[2]);
  if (input == nullptr || weight == nullptr || (args[2] != Py_None && bias == nullptr)) Py_RETURN_NONE;
  const double negative_slope = PyFloat_AsDouble(slope);
  if (negative_slope == -1.0 && PyErr_Occurred()) {  // an int too large for a double: check_negative_slope's
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  at::Tensor x = *input, w = *weight;
  OptTensor b = bias ? OptTensor(*bias) : std::nullopt;
  if (at::autocast::is_autocast_enabled(at::kCPU)) {
    const at::ScalarType dtype = at::autocast::get_autocast_dtype(at::kCPU);
    auto cast = [dtype](at::Tensor& t) {
      if (t.is_floating_point()) t = t.to(dtype);
    };
    cast(x), cast(w);
    if (b.has_value()) cast(*b);
  }
  if (!valid(x, w, b)) Py_RETURN_NONE;
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = linear_act(std::move(x), std::move(w), std::move(b), *act, *name, negative_slope, args[5] == Py_True);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kLinearActDef{"linear_act", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&linear_act_entry)),
                          METH_FASTCALL,
                          "linear_act(input, weight, bias, activation, negative_slope, recompute, backend): the "
                          "output, or None where the call must take fused_backprop's Python path."};

}  // namespace

void add_call_path(pybind11::module_& m) {
  m.add_object("linear_act", pybind11::reinterpret_steal<pybind11::object>(PyCFunction_New(&kLinearActDef, nullptr)));
  m.def("_init_call_path", [](pybind11::object backward, pybind11::object cpu_backend) {
    g_backward = backward.release().ptr();
    g_cpu_backend = cpu_backend.release().ptr();
  }, "Gives the C++ call path autograd.linear_act_backward and the 'cpu' backend (its double backward).");
}

}  // namespace fused_backprop
