"""fused_backprop: fused Linear + activation layers (relu, sigmoid, tanh, leaky_relu, gelu,
gelu_tanh, silu) whose forward and backward run as handwritten kernels (C++ on the CPU, C++/CUDA
and Triton on NVIDIA GPUs)."""

from . import _ops  # noqa: F401  (loads the compiled ops first)
from ._ops import cpu_capability
from . import backends, functional, reference
from .activations import NAMES as ACTIVATIONS
from .backends import available_backends
from .functional import linear_act, linear_relu, linear_sigmoid
from .fuse import FuseRecord, fuse, fuse_report
from .modules import (FusedLinearAct, FusedLinearGELU, FusedLinearLeakyReLU, FusedLinearReLU, FusedLinearSigmoid,
                      FusedLinearSiLU, FusedLinearTanh, FusedMLP)

__all__ = [
    "linear_act", "linear_relu", "linear_sigmoid",
    "ACTIVATIONS", "FusedLinearAct", "FusedLinearReLU", "FusedLinearSigmoid", "FusedLinearTanh", "FusedLinearLeakyReLU",
    "FusedLinearGELU", "FusedLinearSiLU", "FusedMLP",
    "fuse", "fuse_report", "FuseRecord", "available_backends", "cpu_capability", "reference",
]
__version__ = "0.1.0"

backends.load_all()
functional.init_call_path()
