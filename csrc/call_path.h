// The C++ call path of fused_backprop.linear_act (call_path.cpp): _C.linear_act and its setup.
#pragma once

#include <torch/python.h>

namespace fused_backprop {

// Adds _C.linear_act(input, weight, bias, activation, negative_slope, recompute, backend) and
// _C._init_call_path(differentiable_backward, cpu_backend) to the module.
void add_call_path(pybind11::module_& m);

}  // namespace fused_backprop
