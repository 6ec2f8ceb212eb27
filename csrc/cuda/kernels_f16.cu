// Instantiates the CUDA kernels for __half (torch-free: compiles without the torch headers).
#include "kernels.cuh"

namespace fused_backprop::cuda {
FB_CUDA_INSTANTIATE(__half);
}  // namespace fused_backprop::cuda
