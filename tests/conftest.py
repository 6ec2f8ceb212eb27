import os

import torch

# Without a GPU the Triton tests run on CPU tensors through the interpreter, which must be chosen
# before the Triton kernels are defined (fused_backprop.triton is imported). With a GPU, Triton
# (and inductor's generated kernels) run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
