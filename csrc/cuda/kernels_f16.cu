// Instantiates the CUDA kernels for __half, every activation (torch-free: compiles without the torch headers).
#define FB_CUDA_ELEMENT_TYPE __half
#include "instantiate.cuh"
