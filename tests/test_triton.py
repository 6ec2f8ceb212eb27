"""The Triton backend: forward and backward kernels against the torch backend and the NumPy
reference, gradcheck, opcheck and torch.compile of its ops.

On machines without a GPU the kernels run on CPU tensors through the Triton interpreter
(conftest.py sets TRITON_INTERPRET=1 before anything imports triton). The interpreter runs every
program in Python, so the shapes here stay tiny; it does not run bfloat16 (skipped with a reason).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import fused_backprop as fb  # noqa: E402
from fused_backprop import backends, reference, sign_mask  # noqa: E402
from fused_backprop.activations import ACTIVATIONS as ACT_FNS  # noqa: E402
from helpers import ACTIVATIONS, ODD_SHAPES, TOL, assert_close, sample_inputs  # noqa: E402

TRITON = backends.get("triton")
if TRITON is None:
    pytest.skip("the triton backend failed to import", allow_module_level=True)

from fused_backprop.triton import kernels, ops  # noqa: E402

INTERPRET = kernels.INTERPRET
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1 (set before triton is imported)",
                allow_module_level=True)

# The interpreter runs the kernels' math in NumPy, which warns on the (intended) exp() overflow of
# sigmoid at the extremes and on NaN/inf inputs to a matmul.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")]

TORCH_ACT = {"relu": torch.relu, "sigmoid": torch.sigmoid}
TORCH = backends.get("torch")
FLOATS = [torch.float32, torch.float64]
SHAPE_IDS = [f"M{m}K{k}N{n}" for m, k, n in ODD_SHAPES]


@pytest.fixture(params=["two-gemm", "single-pass"])
def path(request, monkeypatch):
    """Which backward kernels run: the two GEMM kernels (dX; dW + db), or the single-pass kernel of
    narrow layers (by default for N, K <= 64; forced here for every test shape, up to 128)."""
    monkeypatch.setattr(ops, "NARROW_MAX", 0 if request.param == "two-gemm" else 128)
    return request.param


def inputs(m, k, n, dtype, **kw):
    return sample_inputs(m, k, n, dtype=dtype, device=DEVICE, **kw)


def grad_like(shape, dtype, seed=1):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g.to(dtype).to(DEVICE)


def np64(t):
    return None if t is None else t.detach().cpu().double().numpy()


def check_np(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    assert_close(actual.detach().cpu(), torch.from_numpy(np.ascontiguousarray(expected)), dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Forward and backward parity on odd shapes.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_forward_parity(dtype, activation, bias, shape, noncontiguous):
    m, k, n = shape
    x, w, b = inputs(m, k, n, dtype, bias=bias, noncontiguous=noncontiguous)
    if noncontiguous and min(m, k, n) > 1:
        assert not x.is_contiguous() and not w.is_contiguous()
    y = fb.linear_act(x, w, b, activation, backend="triton")
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    assert_close(y, TORCH.forward(x, w, b, activation))
    check_np(y, reference.forward(np64(x), np64(w), np64(b), activation), dtype)


@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_backward_parity(dtype, activation, bias, recompute, shape, noncontiguous, path):
    """Every gradient through the public API (autograd.Function -> triton backend) against the
    torch backend's autograd and the NumPy reference."""
    m, k, n = shape
    x, w, b = inputs(m, k, n, dtype, bias=bias, noncontiguous=noncontiguous, requires_grad=True)
    leaves = [t for t in (x, w, b) if t is not None]
    g = grad_like((m, n), dtype)

    y = fb.linear_act(x, w, b, activation, recompute=recompute, backend="triton")
    grads = torch.autograd.grad(y, leaves, g)
    y_ref = fb.linear_act(x, w, b, activation, recompute=recompute, backend="torch")
    grads_ref = torch.autograd.grad(y_ref, leaves, g)
    assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want)

    dx, dw, db = reference.backward(np64(g), np64(x), np64(w), np64(b), None, activation)
    for got, want in zip(grads, (dx, dw, db)):
        check_np(got, want, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_leading_dims_and_1d(activation):
    x, w, b = inputs(3, 6, 5, torch.float64, lead=(2,), requires_grad=True)
    y = fb.linear_act(x, w, b, activation, backend="triton")
    assert y.shape == (2, 3, 5)
    y_ref = TORCH_ACT[activation](F.linear(x, w, b))
    assert_close(y, y_ref)
    g = grad_like(y.shape, torch.float64)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        assert_close(got, want)
    x1, w1, b1 = inputs(None, 6, 5, torch.float64)
    assert_close(fb.linear_act(x1, w1, b1, activation, backend="triton"), TORCH_ACT[activation](F.linear(x1, w1, b1)))


# ------------------------------------------------------------------------------------------------
# The launch wrappers and the registered ops directly: output masks, strides, splits, determinism.
# ------------------------------------------------------------------------------------------------

def _expected_grads(g, x, w, b, activation):
    y = TORCH_ACT[activation](F.linear(x, w, b))
    dz = g * ACT_FNS[activation].grad_from_output(y)
    return y, dz @ w, dz.t() @ x, (dz.sum(0) if b is not None else None)


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True), (False, False, False)],
                         ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_bwd_op_output_mask(mask, recompute, path):
    x, w, b = inputs(37, 13, 11, torch.float64)
    g = grad_like((37, 11), torch.float64)
    y, dx, dw, db = _expected_grads(g, x, w, b, "sigmoid")
    got = torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, None if recompute else y, "sigmoid", list(mask))
    for want, flag, t in zip((dx, dw, db), mask, got):
        if flag:
            assert_close(t, want)
        else:
            assert t.numel() == 0 and t.shape == (0,)
    # bias None: db is masked out whatever output_mask says
    got = torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, None, None, "sigmoid", [True, True, True])
    assert got[2].shape == (0,)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bwd_noncontiguous_grad_and_out(activation, path):
    """grad_out and out as transposed views (strides used, no copies)."""
    x, w, b = inputs(37, 13, 11, torch.float64, noncontiguous=True)
    g = grad_like((11, 37), torch.float64).t()
    y, dx, dw, db = _expected_grads(g, x, w, b, activation)
    y_nc = y.t().contiguous().t()
    assert not g.is_contiguous() and not y_nc.is_contiguous()
    got = ops.linear_act_backward(g, x, w, b, y_nc, activation, (True, True, True))
    for t, want in zip(got, (dx, dw, db)):
        assert_close(t, want)


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_split_reduction(dtype, recompute, splits, path):
    """dW/db over M split in row blocks (what long-M shapes get on a GPU), reduced in a second,
    fixed-order pass: same results, and bitwise deterministic run to run."""
    x, w, b = inputs(130, 65, 33, dtype)
    g = grad_like((130, 33), dtype)
    y, dx, dw, db = _expected_grads(g, x, w, b, "relu")
    out = None if recompute else y
    first = ops.linear_act_backward(g, x, w, b, out, "relu", (True, True, True), splits=splits)
    for t, want in zip(first, (dx, dw, db)):
        assert_close(t, want)
    again = ops.linear_act_backward(g, x, w, b, out, "relu", (True, True, True), splits=splits)
    for a, c in zip(first, again):
        assert torch.equal(a, c)
    db_only = ops.linear_act_backward(g, x, w, b, out, "relu", (False, False, True), splits=splits)
    assert db_only[0] is None and db_only[1] is None
    assert torch.equal(db_only[2], first[2])


@pytest.mark.parametrize("shape", [(37, 13, 16), (130, 65, 40), (5, 1, 8), (37, 13, 11), (6, 9, 1)],
                         ids=lambda s: "M{}K{}N{}".format(*s))
def test_relu_sign_mask_input(shape, path):
    """relu's packed 1-bit sign mask as ``out`` (what recompute=True keeps for relu) is read by the
    kernels directly when N % 8 == 0 (unpacked first otherwise) and gives exactly the gradients of
    the saved output."""
    m, k, n = shape
    x, w, b = inputs(m, k, n, torch.float64, noncontiguous=True)
    y = torch.relu(F.linear(x, w, b))
    y[0, 0] = 0.0  # a kink: relu'(0) = 0
    g = grad_like((m, n), torch.float64)
    packed = sign_mask.pack(y)
    assert packed.dtype == torch.uint8 and packed.shape == ((m * n + 7) // 8,)
    for splits in (None, 2):
        from_out = ops.linear_act_backward(g, x, w, b, y, "relu", (True, True, True), splits=splits)
        from_mask = ops.linear_act_backward(g, x, w, b, packed, "relu", (True, True, True), splits=splits)
        for a, c in zip(from_out, from_mask):
            assert torch.equal(a, c)
    via_op = torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, packed, "relu", [True, True, True])
    dz = g * (y > 0).to(g.dtype)
    for a, c in zip(via_op, (dz @ w, dz.t() @ x, dz.sum(0))):
        assert_close(a, c)


def test_sign_mask_argument_errors():
    x, w, b = inputs(5, 4, 3, torch.float64)
    g = grad_like((5, 3), torch.float64)
    packed = sign_mask.pack(torch.relu(F.linear(x, w, b)))
    with pytest.raises(ValueError, match="only for activation 'relu'"):
        torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, packed, "sigmoid", [True, True, True])
    with pytest.raises(ValueError, match="ceil"):
        torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, packed[:1], "relu", [True, True, True])


def test_relu_recompute_passes_the_sign_mask(monkeypatch):
    """Through the public API, relu with recompute=True hands the packed mask to the kernels
    (the backend accepts it, so nothing unpacks it to an (M, N) tensor first)."""
    assert TRITON.accepts_sign_mask
    seen = []
    backward = ops.linear_act_backward

    def spy(grad_out, x, weight, bias, out, *args, **kwargs):
        seen.append(None if out is None else out.dtype)
        return backward(grad_out, x, weight, bias, out, *args, **kwargs)

    monkeypatch.setattr(ops, "linear_act_backward", spy)
    x, w, b = inputs(9, 6, 8, torch.float64, requires_grad=True)
    y = fb.linear_relu(x, w, b, recompute=True, backend="triton")
    y.sum().backward()
    assert seen == [torch.uint8]


def test_deterministic_through_autograd():
    x, w, b = inputs(130, 65, 33, torch.float32, requires_grad=True)
    g = grad_like((130, 33), torch.float32)
    runs = []
    for _ in range(2):
        y = fb.linear_sigmoid(x, w, b, backend="triton")
        runs.append(torch.autograd.grad(y, (x, w, b), g))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_zero_in_features(activation, recompute, path):
    """K = 0: the pre-activation is the bias (ops level; the public API's flattening is not
    what is tested here)."""
    x = torch.empty((4, 0), dtype=torch.float64, device=DEVICE)
    w = torch.empty((3, 0), dtype=torch.float64, device=DEVICE)
    b = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64, device=DEVICE)
    y = torch.ops.fused_backprop.triton_linear_act_fwd(x, w, b, activation)
    y_ref = TORCH_ACT[activation](F.linear(x, w, b))
    assert_close(y, y_ref)
    g = grad_like((4, 3), torch.float64)
    got = ops.linear_act_backward(g, x, w, b, None if recompute else y, activation, (True, True, True))
    _, dx, dw, db = _expected_grads(g, x, w, b, activation)
    for t, want in zip(got, (dx, dw, db)):
        assert t.shape == want.shape
        assert_close(t, want)


# ------------------------------------------------------------------------------------------------
# Semantics: NaN, relu'(0), sigmoid at the extremes.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates(dtype, activation):
    x = torch.tensor([[float("nan"), 1.0], [0.0, 0.0], [-3.0, 2.0], [float("inf"), 0.0]], dtype=dtype, device=DEVICE)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=dtype, device=DEVICE)
    b = torch.tensor([0.0, float("nan"), 0.5], dtype=dtype, device=DEVICE)
    y = fb.linear_act(x, w, b, activation, backend="triton")
    y_ref = TORCH_ACT[activation](F.linear(x, w, b))
    torch.testing.assert_close(y, y_ref, equal_nan=True, **TOL[dtype])
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().any()


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_backward_matches_torch_backend(activation, recompute):
    """Gradients with a NaN in x and in the incoming gradient: the same NaN pattern (and values
    elsewhere) as the torch backend, which applies dZ = dY * act'(.) the same way."""
    grads = {}
    for backend in ("triton", "torch"):
        x, w, b = inputs(9, 6, 5, torch.float64, requires_grad=False)
        x[2, 3] = float("nan")
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
        g = grad_like((9, 5), torch.float64)
        g[4, 1] = float("nan")
        y = fb.linear_act(x, w, b, activation, recompute=recompute, backend=backend)
        grads[backend] = (y, *torch.autograd.grad(y, (x, w, b), g))
    for got, want in zip(grads["triton"], grads["torch"]):
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, equal_nan=True, **TOL[torch.float64])


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_relu_grad_at_zero_is_zero(recompute):
    # z = 0 exactly in column 0 (x . w = 0, b = 0), > 0 in column 1, < 0 in column 2
    x = torch.tensor([[1.0, -1.0], [2.0, -2.0]], dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = fb.linear_relu(x, w, b, recompute=recompute, backend="triton")
    y.sum().backward()
    assert torch.equal(b.grad.cpu(), torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64))
    assert torch.equal(w.grad[0].cpu(), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_sigmoid_extremes(dtype, recompute):
    big = 1e4 if dtype != torch.float16 else 6e4
    z = torch.tensor([[-big, big, -100.0, 100.0, -20.0, 20.0, 0.0]], dtype=dtype, device=DEVICE)
    x = z.clone().requires_grad_(True)
    w = torch.eye(7, dtype=dtype, device=DEVICE, requires_grad=True)
    y = fb.linear_sigmoid(x, w, None, recompute=recompute, backend="triton")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.sigmoid(z.double()).to(dtype), **TOL[dtype])
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    s = torch.sigmoid(z.double())
    torch.testing.assert_close(x.grad, (s * (1 - s)).to(dtype), **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation, recompute, bias):
    x, w, b = inputs(6, 5, 4, torch.float64, bias=bias, requires_grad=True, seed=3)
    args = (x, w) if b is None else (x, w, b)
    fn = lambda x, w, b=None: fb.linear_act(x, w, b, activation, recompute=recompute, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_op_autograd(activation):
    """The op-level autograd registered on triton_linear_act_fwd."""
    x, w, b = inputs(6, 5, 4, torch.float64, requires_grad=True, seed=4)
    fn = lambda x, w, b: torch.ops.fused_backprop.triton_linear_act_fwd(x, w, b, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def _opcheck_fwd_samples():
    for activation in ACTIVATIONS:
        for bias in (True, False):
            for nc in (False, True):
                x, w, b = inputs(7, 5, 3, torch.float32, bias=bias, noncontiguous=nc, requires_grad=True)
                yield (x, w, b, activation)


def _opcheck_bwd_samples():
    for activation in ACTIVATIONS:
        for recompute in (False, True):
            for mask in ([True, True, True], [True, False, True], [False, True, False]):
                for requires_grad in (False, True):
                    if requires_grad and mask != [True, True, True]:
                        continue
                    x, w, b = inputs(7, 5, 3, torch.float64, requires_grad=requires_grad)
                    y = None if recompute else \
                        TORCH_ACT[activation](F.linear(x, w, b)).detach().requires_grad_(requires_grad)
                    g = grad_like((7, 3), torch.float64).requires_grad_(requires_grad)
                    yield (g, x, w, b, y, activation, mask)
    x, w, _ = inputs(7, 5, 3, torch.float32, bias=False, noncontiguous=True)
    yield (grad_like((7, 3), torch.float32), x, w, None, None, "relu", [True, True, True])
    for n in (3, 8):
        x, w, b = inputs(7, 5, n, torch.float32)
        packed = sign_mask.pack(torch.relu(F.linear(x, w, b)))
        yield (grad_like((7, n), torch.float32), x, w, b, packed, "relu", [True, True, True])


@pytest.mark.parametrize("i", range(len(list(_opcheck_fwd_samples()))))
def test_opcheck_fwd(i):
    args = list(_opcheck_fwd_samples())[i]
    torch.library.opcheck(torch.ops.fused_backprop.triton_linear_act_fwd, args)


@pytest.mark.parametrize("i", range(len(list(_opcheck_bwd_samples()))))
def test_opcheck_bwd(i):
    args = list(_opcheck_bwd_samples())[i]
    torch.library.opcheck(torch.ops.fused_backprop.triton_linear_act_bwd, args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_compile_fused_mlp_fullgraph(activation):
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = fb.FusedMLP([5, 8, 3], activation=activation, backend="triton", device=DEVICE)
    ref = fb.FusedMLP([5, 8, 3], activation=activation, backend="torch", device=DEVICE)
    ref.load_state_dict(mlp.state_dict())
    x = torch.randn(6, 5, device=DEVICE)

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = ops.linear_act_forward, ops.linear_act_backward

    def counting_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def counting_bwd(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)

    compiled = torch.compile(mlp, fullgraph=True)
    try:
        ops.linear_act_forward, ops.linear_act_backward = counting_fwd, counting_bwd
        y = compiled(x)
        y.sum().backward()
    finally:
        ops.linear_act_forward, ops.linear_act_backward = fwd, bwd
    assert calls == {"fwd": 2, "bwd": 2}, calls  # the Triton kernels ran, forward and backward
    y_ref = ref(x)
    y_ref.sum().backward()
    assert_close(y, y_ref)
    for p, q in zip(mlp.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad)


# ------------------------------------------------------------------------------------------------
# 16-bit inputs.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("shape", [(37, 13, 11), (130, 65, 33)], ids=["M37K13N11", "M130K65N33"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fp16_parity(activation, shape, recompute):
    """fp16 inputs, fp32 accumulation: against float64 math on the same fp16 values, with fp16
    tolerances (one rounding of the output, dZ rounded to fp16 before the backward GEMMs as the
    torch backend does)."""
    m, k, n = shape
    x, w, b = inputs(m, k, n, torch.float16, requires_grad=True)
    g = grad_like((m, n), torch.float16)
    y = fb.linear_act(x, w, b, activation, recompute=recompute, backend="triton")
    assert y.dtype == torch.float16
    grads = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = TORCH_ACT[activation](F.linear(x64, w64, b64))
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    assert_close(y, y64, dtype=torch.float16)
    for got, want in zip(grads, grads64):
        assert got.dtype == torch.float16
        assert_close(got, want, dtype=torch.float16)


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's bfloat16 refusal")
def test_bf16_refused_by_interpreter():
    x, w, b = inputs(4, 3, 2, torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 is not supported by the Triton interpreter"):
        fb.linear_act(x, w, b, "relu", backend="triton")


@pytest.mark.skip(reason="bfloat16 is not supported by the Triton interpreter") if INTERPRET else \
    pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bf16_parity_gpu(activation, recompute):
    x, w, b = sample_inputs(257, 130, 65, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    g = grad_like((257, 65), torch.bfloat16)
    y = fb.linear_act(x, w, b, activation, recompute=recompute, backend="triton")
    grads = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = TORCH_ACT[activation](F.linear(x64, w64, b64))
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    assert_close(y, y64, dtype=torch.bfloat16)
    for got, want in zip(grads, grads64):
        assert_close(got, want, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Registration, configuration, errors.
# ------------------------------------------------------------------------------------------------

def test_backend_registration():
    assert TRITON.name == "triton" and TRITON.auto_priority == 1 and not TRITON.differentiable
    assert TRITON.supports(torch.device("cpu")) == INTERPRET
    assert TRITON.supports(torch.device("cuda")) == torch.cuda.is_available()
    assert ("triton" in fb.available_backends("cpu")) == INTERPRET
    if INTERPRET and "cpu" in fb.available_backends("cpu"):
        # the interpreter is for testing: never picked by "auto" ahead of the compiled CPU kernels
        assert fb.available_backends("cpu").index("cpu") < fb.available_backends("cpu").index("triton")


def test_autotune_configs():
    assert {role for role, _ in kernels.TILES} == set(kernels.ROLES)
    for (role, family), tiles in kernels.TILES.items():
        assert family in ("ampere", "hopper", "fma") and tiles
        for a, b, red, warps, stages in tiles:
            for v in (a, b, red):
                assert v >= 16 and v & (v - 1) == 0
            assert warps in (2, 4, 8) and 1 <= stages <= 5
            if role == "dw":
                assert red <= kernels.MAX_BLOCK_M
    for kernel, role in ((kernels._linear_act_forward_kernel, "fwd"),
                         (kernels._linear_act_backward_dz_kernel, "dz"),
                         (kernels._linear_act_backward_dx_kernel, "dx"),
                         (kernels._linear_act_backward_dw_kernel, "dw")):
        assert list(kernel.keys) == ["M", "N", "K"]
        for c in kernel.configs:
            assert set(kernels.ROLES[role]) | {"GROUP"} == set(c.kwargs)
        if INTERPRET:  # one config: the autotuner never benchmarks under the interpreter
            assert len(kernel.configs) == 1


def test_allow_tf32_switch():
    assert ops._input_precision(torch.float32) == "ieee"  # default: exact fp32 products
    assert ops._input_precision(torch.float64) == "ieee"
    try:
        ops.set_allow_tf32(True)
        assert ops.allow_tf32() and ops._input_precision(torch.float32) == "tf32"
    finally:
        ops.set_allow_tf32(False)
    assert not ops.allow_tf32()


def test_op_argument_errors():
    x, w, b = inputs(4, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.fused_backprop.triton_linear_act_fwd(x, w, b, "tanh")
    with pytest.raises(ValueError, match="weight"):
        torch.ops.fused_backprop.triton_linear_act_fwd(x, w.t(), b, "relu")
    with pytest.raises(ValueError, match="bias"):
        torch.ops.fused_backprop.triton_linear_act_fwd(x, w, b[:1], "relu")
    with pytest.raises(TypeError, match="weight"):
        torch.ops.fused_backprop.triton_linear_act_fwd(x, w.double(), b, "relu")
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.fused_backprop.triton_linear_act_bwd(x, x, w, b, None, "relu", [True, True, True])


# ------------------------------------------------------------------------------------------------
# GPU readiness without a GPU: compile the kernels for sm_80 and sm_90 with Triton's own compiler
# and ptxas (both ship in the triton wheel) and read the resource report.
# ------------------------------------------------------------------------------------------------

AOT_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_backprop.triton import kernels as K

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# strides a contiguous launch passes as 1 (Triton specializes them to constants)
UNIT = {"stride_xk", "stride_wk", "stride_b", "stride_on", "stride_dyn", "stride_dzn", "stride_vn",
        "stride_dxk", "stride_dwk", "stride_db"}
ROLE = {"_linear_act_forward_kernel": "fwd", "_linear_act_backward_dz_kernel": "dz",
        "_linear_act_backward_dx_kernel": "dx", "_linear_act_backward_dw_kernel": "dw"}

def jit_fn(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k

def compile_report(kernel, ptrs, constexprs, cfg, arch):
    fn = jit_fn(kernel)
    sig, attrs, consts = {}, {}, {**constexprs, **cfg.kwargs}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in UNIT:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    c = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = c.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([PTXAS, "-arch=" + ("sm_90a" if arch == 90 else "sm_80"), "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return dict(shared=c.metadata.shared, regs=max(int(v) for v in re.findall(r"Used (\d+) registers", out)),
                spill=sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", out)),
                tc="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma")

every = sys.argv[1] == "all"
acc = {"bf16": tl.float32, "fp16": tl.float32, "fp32": tl.float32}
for arch, family, dt, prec in ((80, "ampere", "bf16", "tf32"), (90, "hopper", "bf16", "tf32"),
                               (80, "fma", "fp32", "ieee"), (90, "fma", "fp32", "ieee")):
    for kernel, ptrs, ce in (
        (K._linear_act_forward_kernel, dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, out_ptr=dt),
         dict(ACT=1, HAS_BIAS=True, EVEN_K=True)),
        (K._linear_act_backward_dz_kernel, dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, dy_ptr=dt, dz_ptr=dt),
         dict(ACT=1, HAS_BIAS=True, EVEN_K=True)),
        (K._linear_act_backward_dx_kernel, dict(dy_ptr=dt, v_ptr=dt, w_ptr=dt, dx_ptr=dt),
         dict(ACT=1, MODE=1, EVEN_N=True)),
        (K._linear_act_backward_dw_kernel, dict(dy_ptr=dt, v_ptr=dt, x_ptr=dt, dw_ptr="fp32", db_ptr="fp32"),
         dict(ACT=1, MODE=1, COMPUTE_DW=True, COMPUTE_DB=True)),
        # relu's packed sign mask as the source of act'
        (K._linear_act_backward_dx_kernel, dict(dy_ptr=dt, v_ptr="u8", w_ptr=dt, dx_ptr=dt),
         dict(ACT=0, MODE=2, EVEN_N=True)),
        (K._linear_act_backward_dw_kernel, dict(dy_ptr=dt, v_ptr="u8", x_ptr=dt, dw_ptr="fp32", db_ptr="fp32"),
         dict(ACT=0, MODE=2, COMPUTE_DW=True, COMPUTE_DB=True)),
    ):
        name = jit_fn(kernel).__name__
        configs = [c for c in kernel.configs if K._FAMILY[id(c)] == family]
        if ce.get("MODE") == 2:  # what the autotuner's pruning leaves for the sign-mask mode
            role = ROLE[name]
            configs = [c for c in configs if (role, family, K.config_tile(role, c)) not in K.SIGN_MASK_SPILLS]
        for cfg in (configs if every else configs[:1]):
            rep = compile_report(kernel, ptrs, dict(ce, ACC_DTYPE=acc[dt], INPUT_PRECISION=prec), cfg, arch)
            print(json.dumps(dict(rep, kernel=name, arch=arch, family=family, dtype=dt, config=cfg.kwargs,
                                  warps=cfg.num_warps, stages=cfg.num_stages, mode=ce.get("MODE"))), flush=True)

# the single-pass narrow backward: used on sm_90+ for 16-bit inputs only
kernel = K._linear_act_backward_narrow_kernel
for recompute, mask in ((False, False), (True, False), (False, True)):
    for cfg in (kernel.configs if every else kernel.configs[:1]):
        ptrs = dict(dy_ptr="bf16", v_ptr="u8" if mask else "bf16", x_ptr="bf16", w_ptr="bf16", b_ptr="bf16",
                    dx_ptr="bf16", dw_ptr="fp32", db_ptr="fp32")
        ce = dict(ACT=0 if mask else 1, RECOMPUTE=recompute, SIGN_MASK=mask, HAS_BIAS=True,
                  COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True,
                  ACC_DTYPE=tl.float32, INPUT_PRECISION="tf32", BLOCK_N=K.NARROW_MAX, BLOCK_K=K.NARROW_MAX)
        rep = compile_report(kernel, ptrs, ce, cfg, 90)
        print(json.dumps(dict(rep, kernel=jit_fn(kernel).__name__, arch=90, family="hopper", dtype="bf16",
                              config=cfg.kwargs, warps=cfg.num_warps, stages=cfg.num_stages)), flush=True)
"""


@pytest.mark.skipif(not INTERPRET and torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_aot_compile_sm80_sm90_no_spills():
    """Each kernel's first config per family (every config with FUSED_BACKPROP_AOT_ALL=1) compiles
    for sm_80 and sm_90 with no register spills, within the shared memory of an A100 / H100, on
    tensor cores for bf16 (mma.sync on sm_80, wgmma on sm_90); the single-pass narrow backward
    likewise for sm_90 bf16, the only place it runs on a GPU."""
    import json
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    mode = "all" if os.environ.get("FUSED_BACKPROP_AOT_ALL") == "1" else "first"
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, mode], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) >= 27
    limit = {80: 163 * 1024, 90: 227 * 1024}
    for r in reports:
        assert r["spill"] == 0, r
        assert r["shared"] <= limit[r["arch"]], r
        assert r["tc"] == ("fma" if r["family"] == "fma" else "wgmma" if r["arch"] == 90 else "mma"), r
