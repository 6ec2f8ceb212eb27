// Instantiates the CUDA kernels for __nv_bfloat16, every activation (torch-free: compiles without the torch headers).
#define FB_CUDA_ELEMENT_TYPE __nv_bfloat16
#include "instantiate.cuh"
