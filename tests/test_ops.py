"""The registered ops themselves: torch.library.opcheck, dtypes, and the op-level autograd."""

import pytest
import torch
from helpers import ACTIVATIONS, TOL, assert_close, sample_inputs

import fused_backprop as fb  # noqa: F401  (registers the ops)
from fused_backprop import _ops, sign_mask
from fused_backprop.backends import torch_backend

ops = torch.ops.fused_backprop
pytestmark = pytest.mark.skipif(not fb.backends.get("cpu") or "cpu" not in fb.available_backends(),
                                reason="compiled extension not built")

CASES = [  # (m, k, n, noncontiguous)
    (0, 5, 3, False), (7, 5, 3, False), (7, 5, 3, True), (130, 33, 17, True),
]


def _fwd_args(m, k, n, noncontig, bias, activation, requires_grad):
    x, w, b = sample_inputs(m, k, n, bias=bias, requires_grad=requires_grad, noncontiguous=noncontig)
    return (x, w, b, activation)


@pytest.mark.parametrize("m,k,n,noncontig", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_forward(m, k, n, noncontig, bias, requires_grad, activation):
    torch.library.opcheck(ops.linear_act_fwd, _fwd_args(m, k, n, noncontig, bias, activation, requires_grad))


@pytest.mark.parametrize("m,k,n,noncontig", CASES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_backward(m, k, n, noncontig, recompute, mask, requires_grad, activation):
    x, w, b = sample_inputs(m, k, n, noncontiguous=noncontig, requires_grad=requires_grad)
    out = None if recompute else ops.linear_act_fwd(x, w, b, activation).detach().requires_grad_(requires_grad)
    g = torch.randn(m, n, dtype=x.dtype, requires_grad=requires_grad)
    torch.library.opcheck(ops.linear_act_bwd, (g, x, w, b, out, activation, mask))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_op_is_differentiable(recompute, activation):
    """Differentiating the backward op itself (no silent zero gradients)."""
    x, w, b = sample_inputs(6, 4, 3, requires_grad=True)
    # relu's saved output sits on the kink (exact zeros), where no numerical derivative exists.
    out = ops.linear_act_fwd(x, w, b, activation).detach().requires_grad_(activation == "sigmoid")
    g = torch.randn(6, 3, dtype=x.dtype, requires_grad=True)

    def f(g, x, w, b, out):
        return ops.linear_act_bwd(g, x, w, b, None if recompute else out, activation, [True, True, True])

    assert torch.autograd.gradcheck(f, (g, x, w, b, out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("m", [300, 2500])  # one row chunk; per-thread L2 panels
def test_ops_match_torch_backend(dtype, activation, recompute, m):
    x, w, b = sample_inputs(m, 70, 45, dtype=dtype)
    out = ops.linear_act_fwd(x, w, b, activation)
    # Reference in float64 from the same (rounded) inputs.
    x64, w64, b64 = (t.double() for t in (x, w, b))
    assert_close(out, torch_backend.forward(x64, w64, b64, activation), dtype)
    g = torch.randn(m, 45, dtype=torch.float64).to(dtype)
    got = ops.linear_act_bwd(g, x, w, b, None if recompute else out, activation, [True, True, True])
    # act' from the kernel's own (rounded) output: in 16-bit, a pre-activation within rounding of 0
    # may take either side of relu's kink, and the recomputation must agree with the forward.
    want = torch_backend.backward(g.double(), x64, w64, b64, out.double(), activation, (True, True, True))
    for a, e in zip(got, want):
        # Gradients sum over m terms: allow for the accumulation in the dtype's precision.
        torch.testing.assert_close(a, e.to(dtype), rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 30)


def test_masked_outputs_are_empty():
    x, w, b = sample_inputs(4, 3, 2)
    dx, dw, db = ops.linear_act_bwd(torch.ones(4, 2, dtype=x.dtype), x, w, b, None, "relu", [False, True, False])
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == w.shape


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
def test_eager_bindings_match_ops(bias, mask):
    """The extension's own bindings (the eager path of the cpu/cuda backends) run the same kernels
    below autograd: same values, None for each gradient left out, no graph, fake tensors work."""
    from fused_backprop import _C

    x, w, b = sample_inputs(37, 11, 6, bias=bias, requires_grad=True)
    out = _C.linear_act_fwd(x, w, b, "sigmoid")
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, ops.linear_act_fwd(x, w, b, "sigmoid").detach())
    g = torch.randn_like(out)
    got = _C.linear_act_bwd(g, x, w, b, out, "sigmoid", mask)
    want = ops.linear_act_bwd(g, x, w, b, out, "sigmoid", mask)
    for a, e, wanted in zip(got, want, [mask[0], mask[1], mask[2] and bias]):
        if wanted:
            assert torch.equal(a, e.detach())
        else:
            assert a is None
    x, w = x.detach(), w.detach()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        assert _C.linear_act_fwd(fx, fw, None, "relu").shape == (37, 6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_op_level_autograd(activation):
    """register_autograd gives the registered forward op a backward (saved-output path)."""
    x, w, b = sample_inputs(9, 4, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.linear_act_fwd(*a, activation), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: ops.linear_act_fwd(*a, activation), (x, w, b))


def test_backward_is_deterministic():
    x, w, b = sample_inputs(5000, 40, 30, dtype=torch.float32)
    g = torch.randn(5000, 30)
    runs = [ops.linear_act_bwd(g, x, w, b, None, "sigmoid", [True, True, True]) for _ in range(3)]
    for other in runs[1:]:
        for a, e in zip(runs[0], other):
            assert torch.equal(a, e)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_panels_share_packed_weight(activation):
    """float32 forward over per-thread row panels with both sides of W at least 256 packs W once for
    all panels: 2600 rows in 12 panels of 217, the last one (213 rows) through the plain GEMM. The
    packed buffer is kept for the next call, so calls with a larger and then a smaller W reuse it.
    Each checked against float64 from the same inputs."""
    for k, n in [(256, 260), (300, 280), (256, 260)]:
        x, w, b = sample_inputs(2600, k, n, dtype=torch.float32)
        out = ops.linear_act_fwd(x, w, b, activation)
        want = torch_backend.forward(x.double(), w.double(), b.double(), activation)
        assert_close(out, want, torch.float32)


@pytest.mark.parametrize("activation,saved", [("relu", "out"), ("relu", "recompute"), ("relu", "mask"),
                                              ("sigmoid", "out"), ("sigmoid", "recompute")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_weight_chunked(activation, saved, dtype):
    """A weight larger than L2 takes the row chunks with multithreaded GEMMs (float32: W packed
    once for all chunks). The chunks' output fills half of L3, and they hold at least 1024 rows:
    N is chosen so that a chunk is 1024 rows on this machine, and 2100 rows are 3 chunks, the last
    one partial, so both the packed and the plain GEMM run. Checked against float64 from the same
    inputs."""
    l2, l3 = _ops._C._cache_bytes()
    size = dtype.itemsize
    n = max(410, -(-l3 // 2 // 1024 // size))
    k = l2 // (n * size) + 7
    x, w, b = sample_inputs(2100, k, n, dtype=dtype)
    out = ops.linear_act_fwd(x, w, b, activation)
    x64, w64, b64 = (t.double() for t in (x, w, b))
    assert_close(out, torch_backend.forward(x64, w64, b64, activation), dtype)
    given = {"out": out, "recompute": None, "mask": sign_mask.pack(out)}[saved]
    g = torch.randn(2100, n, dtype=dtype)
    got = ops.linear_act_bwd(g, x, w, b, given, activation, [True, True, True])
    want = torch_backend.backward(g.double(), x64, w64, b64, out.double(), activation, (True, True, True))
    for a, e in zip(got, want):
        # Gradients sum over up to 2100 terms: allow for the accumulation in the dtype's precision.
        torch.testing.assert_close(a, e.to(dtype), rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 30)
