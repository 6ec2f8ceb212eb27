// Instantiates the CUDA kernels for double, every activation (torch-free: compiles without the torch headers).
#define FB_CUDA_ELEMENT_TYPE double
#include "instantiate.cuh"
