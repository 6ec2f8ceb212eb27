"""The CUDA backend on a real GPU, every activation: parity with the torch backend (all dtypes, odd
shapes, recompute, non-contiguous inputs, leaky relu's slope of either sign), the ops themselves
(linear_act_fwd_preact, backward from the saved output or pre-activation, masks, empty inputs),
torch's own functions on NaN, +-inf, +-0 and large |z|, opcheck, float64 gradcheck, torch.compile,
CUDA-graph capture of a forward+backward step, determinism of the bias gradient, and the
current-stream contract. Skipped without a GPU (the kernels still run on the CPU in
test_cuda_harness.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fused_backprop as fb
from fused_backprop.activations import ACTIVATIONS as SPECS
from fused_backprop.activations import saves_output
from helpers import ODD_SHAPES, TOL, assert_close, sample_inputs

HAVE_GPU = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible"),
    pytest.mark.skipif(HAVE_GPU and "cuda" not in fb.available_backends(torch.device("cuda")),
                       reason="the extension was built without the CUDA kernels"),
]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# odd shapes, tile multiples of both the FMA (128/64) and WMMA (64x64x32) tiles, and a larger one;
# (256, 1024, 1024): 16 output tiles, so the forward and recompute GEMMs split K 16 ways
SHAPES = [*ODD_SHAPES, (64, 64, 64), (129, 32, 130), (256, 96, 200), (1000, 300, 257), (256, 1024, 1024)]
DEV = "cuda"
ACTIVATIONS = fb.ACTIVATIONS


def _slope(act):
    """A slope other than the default for leaky relu, so the tests see it reach the kernels."""
    return 0.2 if act == "leaky_relu" else 0.01


def _kept(x, w, b, act, slope):
    """(y, what backward is given as `out`): y itself, or the pre-activation z (gelu, gelu_tanh, silu)."""
    y, z = torch.ops.fused_backprop.linear_act_fwd_preact(x, w, b, act, slope)
    return y, (y if saves_output(act, slope) else z)


def _loose(dtype, k):
    """Reduction-length-aware tolerance for comparing two different low-precision GEMMs."""
    t = dict(TOL[dtype])
    if dtype in (torch.float16, torch.bfloat16):
        t["atol"] = t["atol"] * max(1.0, (k / 64) ** 0.5)
    return t


def _run(backend, x, w, b, act, recompute, grad_out, slope=None):
    slope = _slope(act) if slope is None else slope
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True) if b is not None else None
    y = fb.linear_act(x, w, b, act, negative_slope=slope, recompute=recompute, backend=backend)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _assert_parity(dtype, shape, got, want):
    m, k, n = shape
    for name, a, e, red in zip(("y", "dx", "dw", "db"), got, want, (k, n, m, m)):
        torch.testing.assert_close(a, e, **_loose(dtype, red), msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_with_torch_backend(dtype, act, shape, recompute):
    m, k, n = shape
    x, w, b = sample_inputs(m, k, n, dtype=dtype, device=DEV)
    g = torch.randn(m, n, device=DEV, dtype=torch.float64).to(dtype)
    _assert_parity(dtype, shape, _run("cuda", x, w, b, act, recompute, g), _run("torch", x, w, b, act, recompute, g))


@pytest.mark.parametrize("slope", [0.0, -0.3, 1.5])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leaky_relu_slopes(dtype, recompute, slope):
    # a negative slope: y does not give the branch, so backward takes the recomputed pre-activation
    shape = (130, 65, 33)
    x, w, b = sample_inputs(*shape, dtype=dtype, device=DEV)
    g = torch.randn(shape[0], shape[2], device=DEV, dtype=torch.float64).to(dtype)
    got = _run("cuda", x, w, b, "leaky_relu", recompute, g, slope=slope)
    want = _run("torch", x, w, b, "leaky_relu", recompute, g, slope=slope)
    _assert_parity(dtype, shape, got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_and_no_bias(dtype):
    x, w, _ = sample_inputs(37, 13, 11, dtype=dtype, device=DEV, bias=False, noncontiguous=True)
    assert not x.is_contiguous() and not w.is_contiguous()
    g = torch.randn(37, 11, device=DEV, dtype=dtype)
    for act in ACTIVATIONS:
        got = _run("cuda", x, w, None, act, False, g)
        want = _run("torch", x, w, None, act, False, g)
        for a, e in zip(got[:3], want[:3]):
            assert_close(a, e)
        assert got[3] is None
        y, z = torch.ops.fused_backprop.linear_act_fwd_preact(x, w, None, act, _slope(act))
        assert_close(z, x @ w.t())


def test_row_slices_are_used_in_place():
    # a padded buffer: unit column stride, leading dimension > columns
    buf = torch.randn(50, 40, device=DEV)
    x = buf[:, :33]
    w = torch.randn(17, 33, device=DEV)
    b = torch.randn(17, device=DEV)
    y = torch.ops.fused_backprop.linear_act_fwd(x, w, b, "sigmoid")
    torch.testing.assert_close(y, torch.sigmoid(x @ w.t() + b))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_op_masks_and_empty(act):
    slope = _slope(act)
    x, w, b = sample_inputs(6, 9, 5, dtype=torch.float32, device=DEV)
    y, kept = _kept(x, w, b, act, slope)
    g = torch.randn_like(y)
    dx, dw, db = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, kept, act, [False, True, False], slope)
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == w.shape
    x0 = x[:0]
    y0 = torch.ops.fused_backprop.linear_act_fwd(x0, w, b, act, slope)
    assert y0.shape == (0, 5)
    y0, z0 = torch.ops.fused_backprop.linear_act_fwd_preact(x0, w, b, act, slope)
    assert y0.shape == (0, 5) and z0.shape == (0, 5)
    dx, dw, db = torch.ops.fused_backprop.linear_act_bwd(y0, x0, w, b, None, act, [True, True, True], slope)
    assert dx.shape == (0, 9) and torch.all(dw == 0) and torch.all(db == 0)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_preact_op(dtype, act):
    # y: the same bits as linear_act_fwd's; z: the pre-activation, rounded once to the dtype
    shape = (129, 65, 130)
    x, w, b = sample_inputs(*shape, dtype=dtype, device=DEV)
    y, z = torch.ops.fused_backprop.linear_act_fwd_preact(x, w, b, act, _slope(act))
    assert torch.equal(y, torch.ops.fused_backprop.linear_act_fwd(x, w, b, act, _slope(act)))
    want = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(z, want.to(dtype), **_loose(dtype, shape[1]))


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_from_saved_matches_recompute(dtype, act):
    # from y (relu, sigmoid, tanh, leaky relu) or z (gelu, gelu_tanh, silu) as from the recomputed z
    slope, shape = _slope(act), (200, 48, 72)
    x, w, b = sample_inputs(*shape, dtype=dtype, device=DEV)
    y, kept = _kept(x, w, b, act, slope)
    g = torch.randn_like(y)
    saved = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, kept, act, [True, True, True], slope)
    recomputed = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, None, act, [True, True, True], slope)
    _assert_parity(dtype, shape, (y, *saved), (y, *recomputed))


# NaN, +-inf, +-0, tiny, moderate and large |z|: where exp, erf and tanh saturate
SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 20.0, -20.0, 90.0, -90.0,
           1e4, -1e4]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_special_values_match_torch(dtype, act, recompute):
    # x = 0 and W = 0 make z = b exactly: the kernels' activation and derivative at the special
    # values against torch's own function (F.gelu, F.silu, ...) under autograd
    slope = _slope(act)
    b = torch.tensor(SPECIAL, dtype=dtype, device=DEV)
    x = torch.zeros(3, 1, dtype=dtype, device=DEV)
    w = torch.zeros(b.numel(), 1, dtype=dtype, device=DEV)
    g = torch.ones(3, b.numel(), dtype=dtype, device=DEV)
    got = _run("cuda", x, w, b, act, recompute, g, slope=slope)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = SPECS[act].forward(F.linear(*leaves), slope)
    y.backward(g)
    for name, a, e in zip(("y", "dx", "dw", "db"), got, (y.detach(), *(t.grad for t in leaves))):
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("act", ["sigmoid", "gelu"])
def test_bias_grad_is_deterministic(act):
    # from the saved output (sigmoid) and the saved pre-activation (gelu)
    x, w, b = sample_inputs(5000, 64, 96, dtype=torch.float32, device=DEV)
    y, kept = _kept(x, w, b, act, 0.01)
    g = torch.randn_like(y)
    first = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, kept, act, [True, True, True])
    for _ in range(3):
        again = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, kept, act, [True, True, True])
        for a, e in zip(again, first):
            assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_opcheck(dtype, act):
    slope = _slope(act)
    x, w, b = sample_inputs(37, 13, 11, dtype=dtype, device=DEV)
    torch.library.opcheck(torch.ops.fused_backprop.linear_act_fwd.default, (x, w, b, act, slope))
    torch.library.opcheck(torch.ops.fused_backprop.linear_act_fwd_preact.default, (x, w, b, act, slope))
    y, kept = _kept(x, w, b, act, slope)
    g = torch.randn_like(y)
    for out in (kept, None):
        torch.library.opcheck(torch.ops.fused_backprop.linear_act_bwd.default,
                              (g, x, w, b, out, act, [True, True, True], slope))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64(act, recompute):
    x, w, b = sample_inputs(7, 5, 4, dtype=torch.float64, device=DEV, requires_grad=True)
    if SPECS[act].sign_decides:  # keep pre-activations away from the kink (relu, leaky relu)
        with torch.no_grad():
            b.add_(torch.sign(b) * 0.5)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fb.linear_act(x, w, b, act, negative_slope=_slope(act), recompute=recompute, backend="cuda"),
        (x, w, b))


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile(compiler, act):
    torch._dynamo.reset()
    model = fb.FusedMLP([33, 64, 17], activation=act, backend="cuda", device=DEV)
    x = torch.randn(45, 33, device=DEV)
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    y_ref = model(x)
    y_ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_ref)
    for p, r in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r)


@pytest.mark.parametrize("layer_type, reference", [(fb.FusedLinearSigmoid, torch.sigmoid), (fb.FusedLinearGELU, F.gelu)],
                         ids=["sigmoid", "gelu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_cuda_graph_capture_forward_backward(recompute, layer_type, reference):
    layer = layer_type(40, 24, recompute=recompute, backend="cuda", device=DEV)
    static_x = torch.randn(70, 40, device=DEV, requires_grad=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph
        for _ in range(2):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            layer(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.sum().backward()
    for _ in range(2):
        new_x = torch.randn(70, 40, device=DEV)
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        x = new_x.clone().requires_grad_(True)
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone().requires_grad_(True)
        y = reference(F.linear(x, w, b))
        y.sum().backward()
        torch.testing.assert_close(static_y, y)
        torch.testing.assert_close(static_x.grad, x.grad)
        torch.testing.assert_close(layer.weight.grad, w.grad)
        torch.testing.assert_close(layer.bias.grad, b.grad)


def test_runs_on_current_stream_and_device_guard():
    x, w, b = sample_inputs(300, 70, 260, dtype=torch.float32, device=DEV)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = torch.ops.fused_backprop.linear_act_fwd(x, w, b, "relu")
        g = torch.ones_like(y)
        dx, dw, db = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, y, "relu", [True, True, True])
    s.synchronize()
    torch.testing.assert_close(y, torch.relu(x @ w.t() + b))
    torch.testing.assert_close(db, (y > 0).to(y.dtype).sum(0))
