// Instantiates the CUDA kernels for float, every activation (torch-free: compiles without the torch headers).
#define FB_CUDA_ELEMENT_TYPE float
#include "instantiate.cuh"
