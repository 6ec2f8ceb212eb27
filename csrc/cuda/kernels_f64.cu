// Instantiates the CUDA kernels for double (torch-free: compiles without the torch headers).
#include "kernels.cuh"

namespace fused_backprop::cuda {
FB_CUDA_INSTANTIATE(double);
}  // namespace fused_backprop::cuda
