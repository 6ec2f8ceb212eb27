// The CPU kernels at the AVX2 level: setup.py compiles this file with that level's flags.
#include "cpu/kernels_impl.h"
