"""fused_backprop: fused Linear+ReLU and Linear+Sigmoid layers whose forward and backward run as
handwritten kernels (C++ on the CPU, C++/CUDA and Triton on NVIDIA GPUs)."""

from . import _ops  # noqa: F401  (loads the compiled ops first)
from ._ops import cpu_capability
from . import backends, reference
from .backends import available_backends
from .functional import linear_act, linear_relu, linear_sigmoid
from .fuse import FuseRecord, fuse, fuse_report
from .modules import FusedLinearAct, FusedLinearReLU, FusedLinearSigmoid, FusedMLP

__all__ = [
    "linear_act", "linear_relu", "linear_sigmoid",
    "FusedLinearAct", "FusedLinearReLU", "FusedLinearSigmoid", "FusedMLP",
    "fuse", "fuse_report", "FuseRecord", "available_backends", "cpu_capability", "reference",
]
__version__ = "0.1.0"

backends.load_all()
