// Explicit instantiation of everything the glue calls, for the element type FB_CUDA_ELEMENT_TYPE
// (each kernels_<dtype>.cu defines it and includes this file): the workspace query, and the
// forward and backward launchers for every activation of activations.def.
#include "kernels.cuh"

#ifndef FB_CUDA_ELEMENT_TYPE
#error "define FB_CUDA_ELEMENT_TYPE (the element type to instantiate the kernels for) before including instantiate.cuh"
#endif

namespace fused_backprop::cuda {

template size_t fwd_workspace_bytes<FB_CUDA_ELEMENT_TYPE>(int64_t, int64_t, int64_t);
template size_t bwd_workspace_bytes<FB_CUDA_ELEMENT_TYPE>(int64_t, int64_t, int64_t, bool, bool, bool, bool);

#define FB_ACTIVATION(E, name, saved, sign)                                                                  \
  template void launch_forward<FB_CUDA_ELEMENT_TYPE, Activation::E>(const FwdProblem<FB_CUDA_ELEMENT_TYPE>&, \
                                                                    cudaStream_t, LaunchCheck);              \
  template void launch_backward<FB_CUDA_ELEMENT_TYPE, Activation::E>(const BwdProblem<FB_CUDA_ELEMENT_TYPE>&, \
                                                                     cudaStream_t, LaunchCheck);
#include "../activations.def"
#undef FB_ACTIVATION

}  // namespace fused_backprop::cuda
