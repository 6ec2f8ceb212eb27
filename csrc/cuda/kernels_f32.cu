// Instantiates the CUDA kernels for float (torch-free: compiles without the torch headers).
#include "kernels.cuh"

namespace fused_backprop::cuda {
FB_CUDA_INSTANTIATE(float);
}  // namespace fused_backprop::cuda
