// The CPU kernels at the AVX512 level: setup.py compiles this file with that level's flags.
#include "cpu/kernels_impl.h"
