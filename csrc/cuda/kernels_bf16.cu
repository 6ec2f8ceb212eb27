// Instantiates the CUDA kernels for __nv_bfloat16 (torch-free: compiles without the torch headers).
#include "kernels.cuh"

namespace fused_backprop::cuda {
FB_CUDA_INSTANTIATE(__nv_bfloat16);
}  // namespace fused_backprop::cuda
