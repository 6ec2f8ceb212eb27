"""The Triton backend: forward and backward kernels against torch's own activations, the torch
backend and the NumPy reference, for every activation of the registry; the activation formulas
themselves on NaN, +-inf, +-0 and large |z|; gradcheck, opcheck and torch.compile of its ops.

On machines without a GPU the kernels run on CPU tensors through the Triton interpreter
(conftest.py sets TRITON_INTERPRET=1 before anything imports triton). The interpreter runs every
program in Python, so the shapes here stay tiny; it does not run bfloat16 (skipped with a reason).
The full grids of shapes, layouts and backward paths run for relu and sigmoid (``GRID_CASES``: the
tiling does not depend on the activation); every activation (and leaky relu's other slopes,
``ACT_CASES``) runs every mode of backward on a few odd shapes.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fused_backprop as fb  # noqa: E402
from fused_backprop import backends, reference, sign_mask  # noqa: E402
from fused_backprop.activations import NAMES, saves_output, uses_sign_mask  # noqa: E402
from helpers import (ACT_CASES, ACTIVATIONS, DEFAULT_SLOPE, ODD_SHAPES, TOL, TORCH_FUNCTIONS,  # noqa: E402
                     assert_close, sample_inputs, torch_layer)

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
# sigmoid and silu at the extremes, on NaN/inf inputs to a matmul, and on the branch of a
# tl.where that is computed and discarded (tanh's polynomial at |z| >> 1, inf * 0 at +-inf).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning")]

TORCH = backends.get("torch")
FLOATS = [torch.float32, torch.float64]
SHAPE_IDS = [f"M{m}K{k}N{n}" for m, k, n in ODD_SHAPES]
# The full grids (every odd shape, layout, bias and backward path) for two activations; the
# activation-specific math runs for all of ACT_CASES on FEW_SHAPES.
GRID_CASES = [pytest.param("relu", DEFAULT_SLOPE, id="relu"), pytest.param("sigmoid", DEFAULT_SLOPE, id="sigmoid")]
FEW_SHAPES = [(0, 5, 3), (5, 1, 6), (37, 13, 11)]
FEW_SHAPE_IDS = [f"M{m}K{k}N{n}" for m, k, n in FEW_SHAPES]
# (activation, slope) with a packed sign mask: relu, and leaky relu at the default, a non-default
# and a zero slope.
MASK_CASES = [pytest.param("relu", DEFAULT_SLOPE, id="relu"), pytest.param("leaky_relu", DEFAULT_SLOPE, id="leaky"),
              pytest.param("leaky_relu", 0.2, id="leaky0.2"), pytest.param("leaky_relu", 0.0, id="leaky0")]


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


def torch_act(z, activation, slope=DEFAULT_SLOPE):
    """torch's own activation (helpers.TORCH_FUNCTIONS, not the package's registry)."""
    return TORCH_FUNCTIONS[activation](z, slope)


def kept(y, z, activation, slope):
    """What backward takes as ``out`` for a layer with output y and pre-activation z."""
    return y if saves_output(activation, slope) else z


def expected_grads(g, x, w, b, activation, slope=DEFAULT_SLOPE):
    """(y, z, dx, dw, db) from torch's own activation and autograd, in x's dtype."""
    z = F.linear(x, w, b)
    zr = z.detach().requires_grad_(True)
    y = torch_act(zr, activation, slope)
    dz, = torch.autograd.grad(y, zr, g)
    return y.detach(), z, dz @ w, dz.t() @ x, (dz.sum(0) if b is not None else None)


# ------------------------------------------------------------------------------------------------
# The registry and the codes.
# ------------------------------------------------------------------------------------------------

def test_every_registry_name_has_a_triton_code():
    assert tuple(kernels.ACTIVATION_CODES) == NAMES == tuple(ACTIVATIONS)
    assert sorted(kernels.ACTIVATION_CODES.values()) == list(range(len(NAMES)))
    for name in NAMES:
        assert ops._activation_code(name) == kernels.ACTIVATION_CODES[name]


# ------------------------------------------------------------------------------------------------
# The activation formulas on their own, elementwise: against torch on special values.
# ------------------------------------------------------------------------------------------------

@triton.jit
def _pointwise_kernel(z_ptr, y_ptr, dz_ptr, dy_ptr, n, negative_slope: tl.float64, ACT: tl.constexpr,
                      FROM_OUTPUT: tl.constexpr, BLOCK: tl.constexpr):
    """act(z), act'(z) from z, and (FROM_OUTPUT) act'(z) from y = act(z), elementwise."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    y = kernels._activation(z, negative_slope, ACT)
    tl.store(y_ptr + offs, y, mask=mask)
    tl.store(dz_ptr + offs, kernels._activation_grad(z, negative_slope, False, ACT), mask=mask)
    if FROM_OUTPUT:
        tl.store(dy_ptr + offs, kernels._activation_grad(y, negative_slope, True, ACT), mask=mask)


def pointwise(z, activation, slope):
    """(act(z), act'(z) from z, act'(z) from act(z) or None) by the kernels' own formulas."""
    y, dz, dy = torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)
    from_output = saves_output(activation, slope)
    _pointwise_kernel[(1,)](z, y, dz, dy, z.numel(), float(slope), ACT=kernels.ACTIVATION_CODES[activation],
                            FROM_OUTPUT=from_output, BLOCK=triton.next_power_of_2(z.numel()))
    return y, dz, (dy if from_output else None)


INF, NAN = float("inf"), float("nan")
SPECIAL = [NAN, INF, -INF, 0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 0.3, -0.3, 3.0, -3.0, 10.0, -10.0, 20.0, -20.0,
           100.0, -100.0, 1e4, -1e4]
BIG = {torch.float32: 3e38, torch.float64: 1e300}  # near the top of the dtype: z^2, z^3 overflow
# Where torch's CPU kernel gives an artefact of its vectorised math rather than the formula's
# value (which torch's float64 kernel gives): fp32 gelu at +inf is NaN (its erf(+inf) is NaN) and
# at 3e38 is inf. The Triton kernels compute the formula (see kernels._activation); these points
# are checked against torch in float64.
TORCH_CPU_ARTEFACTS = {("gelu", torch.float32): (INF, 3e38)}


def special_values(dtype):
    return torch.tensor(SPECIAL + [BIG[dtype], -BIG[dtype]], dtype=dtype, device=DEVICE)


def torch_reference(z, activation, slope):
    """torch's own activation and its autograd derivative at z, in z's dtype, with the artefact
    points of TORCH_CPU_ARTEFACTS taken from float64."""
    zr = z.detach().clone().requires_grad_(True)
    y = torch_act(zr, activation, slope)
    d, = torch.autograd.grad(y.sum(), zr)
    y = y.detach()
    artefacts = TORCH_CPU_ARTEFACTS.get((activation, z.dtype))
    if artefacts is not None and z.device.type == "cpu":
        at = torch.isin(z, torch.tensor(artefacts, dtype=z.dtype))
        assert at.any()
        y = torch.where(at, torch_act(z.double(), activation, slope).to(z.dtype), y)
    return y, d


def assert_same_values(got, want, dtype):
    """Close (NaN where NaN), and the same sign where both are zero."""
    torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])
    both_zero = (got == 0) & (want == 0)
    assert torch.equal(torch.signbit(got[both_zero]), torch.signbit(want[both_zero]))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_formulas_on_special_values(activation, slope, dtype):
    """act(z) and act'(z) (from z and, where backward keeps it, from y) at NaN, +-inf, +-0, tiny,
    moderate and large |z|, against torch's function and autograd at the same dtype."""
    z = special_values(dtype)
    y, dz, dy = pointwise(z, activation, slope)
    y_ref, d_ref = torch_reference(z, activation, slope)
    assert_same_values(y, y_ref, dtype)
    assert_same_values(dz, d_ref, dtype)
    if dy is not None:
        assert_same_values(dy, d_ref, dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_gelu_at_inf_is_the_limit(dtype):
    """gelu(+inf) = +inf and gelu(-inf) = NaN (z Phi(z) = -inf * 0 as written), as torch computes
    them in float64; torch's fp32 CPU kernel gives NaN at +inf (TORCH_CPU_ARTEFACTS)."""
    y, dz, _ = pointwise(torch.tensor([INF, -INF], dtype=dtype, device=DEVICE), "gelu", DEFAULT_SLOPE)
    assert y[0].item() == INF and math.isnan(y[1].item()) and dz.isnan().all()
    torch64 = F.gelu(torch.tensor([INF, -INF], dtype=torch.float64))
    assert torch64[0].item() == INF and math.isnan(torch64[1].item())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_tanh_accuracy(dtype):
    """The exp-based tanh (tanh and gelu_tanh use it) within a few ulp of torch's float64 tanh
    over both sides of the polynomial's threshold, in relative terms down to |z| = 1e-30."""
    z = torch.cat([torch.linspace(-4, 4, 4001, dtype=torch.float64), torch.logspace(-30, 0, 301, dtype=torch.float64)])
    at_threshold = torch.tensor([0.25, -0.25], dtype=torch.float64)
    z = torch.cat([z, -z, at_threshold, at_threshold.nextafter(torch.zeros(2, dtype=torch.float64))])
    z = z.to(dtype)
    y, _, _ = pointwise(z.to(DEVICE), "tanh", DEFAULT_SLOPE)
    want = torch.tanh(z.double())
    eps = torch.finfo(dtype).eps
    nonzero = want != 0
    rel = ((y.cpu().double() - want).abs() / want.abs())[nonzero]
    assert rel.max().item() <= 4 * eps, rel.max().item()
    assert torch.equal(y.cpu()[~nonzero], z[~nonzero])


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_formulas_match_torch_on_a_grid(activation, slope):
    """act and act' against torch's function and autograd on a dense grid of z, in float64."""
    z = torch.linspace(-12, 12, 2001, dtype=torch.float64, device=DEVICE)
    y, dz, dy = pointwise(z, activation, slope)
    y_ref, d_ref = torch_reference(z, activation, slope)
    assert_close(y, y_ref)
    assert_close(dz, d_ref)
    if dy is not None:
        assert_close(dy, d_ref)


# ------------------------------------------------------------------------------------------------
# Forward and backward parity on odd shapes, through the public API.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation,slope", GRID_CASES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_forward_parity(dtype, activation, slope, bias, shape, noncontiguous):
    m, k, n = shape
    x, w, b = inputs(m, k, n, dtype, bias=bias, noncontiguous=noncontiguous)
    if noncontiguous and min(m, k, n) > 1:
        assert not x.is_contiguous() and not w.is_contiguous()
    y = fb.linear_act(x, w, b, activation, negative_slope=slope, backend="triton")
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    assert_close(y, TORCH.forward(x, w, b, activation, slope))
    check_np(y, reference.forward(np64(x), np64(w), np64(b), activation, slope), dtype)


@pytest.mark.parametrize("shape", FEW_SHAPES, ids=FEW_SHAPE_IDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_forward_parity_every_activation(dtype, activation, slope, shape):
    """Every activation against torch's own function and the NumPy reference, also through
    forward_preact (the epilogue that stores z too)."""
    m, k, n = shape
    x, w, b = inputs(m, k, n, dtype, noncontiguous=True)
    y = fb.linear_act(x, w, b, activation, negative_slope=slope, backend="triton")
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, torch_act(F.linear(x, w, b), activation, slope))
    check_np(y, reference.forward(np64(x), np64(w), np64(b), activation, slope), dtype)
    y2, z = TRITON.forward_preact(x, w, b, activation, slope)
    assert torch.equal(y2, y)
    assert z.shape == (m, n) and z.dtype == dtype
    assert_close(z, F.linear(x, w, b))


def _backward_parity(dtype, activation, slope, bias, recompute, shape, noncontiguous):
    """Every gradient through the public API (autograd.Function -> triton backend) against the
    torch backend's autograd, torch's own activation and the NumPy reference."""
    m, k, n = shape
    x, w, b = inputs(m, k, n, dtype, bias=bias, noncontiguous=noncontiguous, requires_grad=True)
    leaves = [t for t in (x, w, b) if t is not None]
    g = grad_like((m, n), dtype)

    y = fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=recompute, backend="triton")
    grads = torch.autograd.grad(y, leaves, g)
    y_ref = fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=recompute, backend="torch")
    grads_ref = torch.autograd.grad(y_ref, leaves, g)
    assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want)
    y_own = torch_layer(activation, slope)(x, w, b)
    for got, want in zip(grads, torch.autograd.grad(y_own, leaves, g)):
        assert_close(got, want)

    dx, dw, db = reference.backward(np64(g), np64(x), np64(w), np64(b), None, activation, slope)
    for got, want in zip(grads, (dx, dw, db)):
        check_np(got, want, dtype)


@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation,slope", GRID_CASES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_backward_parity(dtype, activation, slope, bias, recompute, shape, noncontiguous, path):
    _backward_parity(dtype, activation, slope, bias, recompute, shape, noncontiguous)


@pytest.mark.parametrize("shape", FEW_SHAPES, ids=FEW_SHAPE_IDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_backward_parity_every_activation(dtype, activation, slope, recompute, shape, path):
    """Every activation and slope, saved (y or z, as the registry says) and recomputed (or the
    sign mask), on both backward paths."""
    _backward_parity(dtype, activation, slope, True, recompute, shape, True)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_leading_dims_and_1d(activation, slope):
    x, w, b = inputs(3, 6, 5, torch.float64, lead=(2,), requires_grad=True)
    y = fb.linear_act(x, w, b, activation, negative_slope=slope, backend="triton")
    assert y.shape == (2, 3, 5)
    y_ref = torch_act(F.linear(x, w, b), activation, slope)
    assert_close(y, y_ref)
    g = grad_like(y.shape, torch.float64)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        assert_close(got, want)
    x1, w1, b1 = inputs(None, 6, 5, torch.float64)
    assert_close(fb.linear_act(x1, w1, b1, activation, negative_slope=slope, backend="triton"),
                 torch_act(F.linear(x1, w1, b1), activation, slope))


# ------------------------------------------------------------------------------------------------
# The launch wrappers and the registered ops directly: output masks, strides, splits, determinism.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True), (False, False, False)],
                         ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_bwd_op_output_mask(mask, recompute, path):
    x, w, b = inputs(37, 13, 11, torch.float64)
    g = grad_like((37, 11), torch.float64)
    for activation in ("sigmoid", "gelu"):  # backward from y, and from z
        y, z, dx, dw, db = expected_grads(g, x, w, b, activation)
        out = None if recompute else kept(y, z, activation, DEFAULT_SLOPE)
        got = torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, out, activation, list(mask))
        for want, flag, t in zip((dx, dw, db), mask, got):
            if flag:
                assert_close(t, want)
            else:
                assert t.numel() == 0 and t.shape == (0,)
    # bias None: db is masked out whatever output_mask says
    got = torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, None, None, "sigmoid", [True, True, True])
    assert got[2].shape == (0,)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_bwd_noncontiguous_grad_and_out(activation, slope, path):
    """grad_out and out (y or z) as transposed views (strides used, no copies)."""
    x, w, b = inputs(37, 13, 11, torch.float64, noncontiguous=True)
    g = grad_like((11, 37), torch.float64).t()
    y, z, dx, dw, db = expected_grads(g, x, w, b, activation, slope)
    out_nc = kept(y, z, activation, slope).t().contiguous().t()
    assert not g.is_contiguous() and not out_nc.is_contiguous()
    got = ops.linear_act_backward(g, x, w, b, out_nc, activation, (True, True, True), slope)
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
    y, _, dx, dw, db = expected_grads(g, x, w, b, "relu")
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


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("activation,slope", [pytest.param("gelu", DEFAULT_SLOPE, id="gelu"),
                                              pytest.param("leaky_relu", -0.5, id="leaky-0.5")])
def test_split_reduction_from_preact(activation, slope, splits, path):
    """The split dW/db reduction when backward reads z."""
    x, w, b = inputs(130, 20, 24, torch.float64)
    g = grad_like((130, 24), torch.float64)
    _, z, dx, dw, db = expected_grads(g, x, w, b, activation, slope)
    got = ops.linear_act_backward(g, x, w, b, z, activation, (True, True, True), slope, splits=splits)
    for t, want in zip(got, (dx, dw, db)):
        assert_close(t, want)


@pytest.mark.parametrize("shape", [(37, 13, 16), (130, 65, 40), (5, 1, 8), (37, 13, 11), (6, 9, 1)],
                         ids=lambda s: "M{}K{}N{}".format(*s))
@pytest.mark.parametrize("activation,slope", MASK_CASES)
def test_sign_mask_input(activation, slope, shape, path):
    """The packed 1-bit sign mask as ``out`` (what recompute=True keeps for relu and leaky relu)
    is read by the kernels directly (whole bytes per row when N % 8 == 0, one bit per element
    otherwise) and gives exactly the gradients of the saved output."""
    m, k, n = shape
    x, w, b = inputs(m, k, n, torch.float64, noncontiguous=True)
    y = torch_act(F.linear(x, w, b), activation, slope)
    y[0, 0] = 0.0  # a kink: relu'(0) = 0, leaky'(0) = a
    g = grad_like((m, n), torch.float64)
    packed = sign_mask.pack_composite(y, activation)
    assert packed.dtype == torch.uint8 and packed.shape == ((m * n + 7) // 8,)
    for splits in (None, 2):
        from_out = ops.linear_act_backward(g, x, w, b, y, activation, (True, True, True), slope, splits=splits)
        from_mask = ops.linear_act_backward(g, x, w, b, packed, activation, (True, True, True), slope, splits=splits)
        for a, c in zip(from_out, from_mask):
            assert torch.equal(a, c)
    via_op = torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, packed, activation, [True, True, True], slope)
    dz = torch.where(y > 0, g, g * (slope if activation == "leaky_relu" else 0.0))
    for a, c in zip(via_op, (dz @ w, dz.t() @ x, dz.sum(0))):
        assert_close(a, c)


@pytest.mark.parametrize("n", [8, 11])
@pytest.mark.parametrize("activation,slope", MASK_CASES[:3])
def test_sign_mask_nan(activation, slope, n, path):
    """From the mask, dz = g where the bit is set, else 0 for relu (also for a NaN g, as
    threshold_backward) and a g for leaky relu (NaN stays NaN); a NaN output sets relu's bit
    (the gradient passes) and clears leaky relu's (the slope applies)."""
    x, w, b = inputs(9, 6, n, torch.float64)
    y = torch_act(F.linear(x, w, b), activation, slope)
    y[1, 2] = NAN
    g = grad_like((9, n), torch.float64)
    off = (y <= 0).nonzero()[0].tolist()
    g[off[0], off[1]] = NAN
    packed = sign_mask.pack_composite(y, activation)
    bit = (y <= 0).logical_not() if activation == "relu" else y > 0
    assert bit[1, 2].item() == (activation == "relu")
    dz = torch.where(bit, g, g * slope if activation == "leaky_relu" else torch.zeros_like(g))
    assert dz[off[0], off[1]].isnan().item() == (activation == "leaky_relu")
    got = ops.linear_act_backward(g, x, w, b, packed, activation, (False, False, True), slope)
    torch.testing.assert_close(got[2], dz.sum(0), equal_nan=True, **TOL[torch.float64])


def test_sign_mask_argument_errors():
    x, w, b = inputs(5, 4, 3, torch.float64)
    g = grad_like((5, 3), torch.float64)
    packed = sign_mask.pack_composite(torch.relu(F.linear(x, w, b)), "relu")
    with pytest.raises(ValueError, match="only for activation 'relu' or 'leaky_relu'"):
        torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, packed, "sigmoid", [True, True, True])
    with pytest.raises(ValueError, match="negative_slope >= 0"):  # y > 0 does not tell the branch
        torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, packed, "leaky_relu", [True, True, True], -0.5)
    with pytest.raises(ValueError, match="ceil"):
        torch.ops.fused_backprop.triton_linear_act_bwd(g, x, w, b, packed[:1], "relu", [True, True, True])


@pytest.mark.parametrize("activation,slope", MASK_CASES[:3])
def test_recompute_passes_the_sign_mask(activation, slope, monkeypatch):
    """Through the public API, relu and leaky relu with recompute=True hand the packed mask to the
    kernels (the backend accepts it, so nothing unpacks it to an (M, N) tensor first)."""
    assert TRITON.accepts_sign_mask
    seen = []
    backward = ops.linear_act_backward

    def spy(grad_out, x, weight, bias, out, *args, **kwargs):
        seen.append(None if out is None else out.dtype)
        return backward(grad_out, x, weight, bias, out, *args, **kwargs)

    monkeypatch.setattr(ops, "linear_act_backward", spy)
    x, w, b = inputs(9, 6, 8, torch.float64, requires_grad=True)
    y = fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=True, backend="triton")
    y.sum().backward()
    assert seen == [torch.uint8]


def test_deterministic_through_autograd():
    x, w, b = inputs(130, 65, 33, torch.float32, requires_grad=True)
    g = grad_like((130, 33), torch.float32)
    for activation in ("sigmoid", "gelu"):
        runs = []
        for _ in range(2):
            y = fb.linear_act(x, w, b, activation, backend="triton")
            runs.append(torch.autograd.grad(y, (x, w, b), g))
        for a, c in zip(*runs):
            assert torch.equal(a, c)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_zero_in_features(activation, slope, recompute, path):
    """K = 0: the pre-activation is the bias (ops level; the public API's flattening is not
    what is tested here), for forward, forward_preact and backward from y, z or the sign mask."""
    x = torch.empty((4, 0), dtype=torch.float64, device=DEVICE)
    w = torch.empty((3, 0), dtype=torch.float64, device=DEVICE)
    b = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64, device=DEVICE)
    y = torch.ops.fused_backprop.triton_linear_act_fwd(x, w, b, activation, slope)
    y_ref = torch_act(F.linear(x, w, b), activation, slope)
    assert_close(y, y_ref)
    y2, z = torch.ops.fused_backprop.triton_linear_act_fwd_preact(x, w, b, activation, slope)
    assert torch.equal(y2, y) and torch.equal(z, b.expand(4, 3))
    g = grad_like((4, 3), torch.float64)
    outs = [None] if recompute else [kept(y, z, activation, slope)]
    if recompute and uses_sign_mask(activation, slope):
        outs.append(sign_mask.pack_composite(y, activation))
    _, _, dx, dw, db = expected_grads(g, x, w, b, activation, slope)
    for out in outs:
        got = ops.linear_act_backward(g, x, w, b, out, activation, (True, True, True), slope)
        for t, want in zip(got, (dx, dw, db)):
            assert t.shape == want.shape
            assert_close(t, want)


# ------------------------------------------------------------------------------------------------
# Semantics: NaN, +-inf, extremes through the whole layer; relu'(0); sigmoid at the extremes.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_nan_propagates(dtype, activation, slope):
    """NaN and inf in x and b. The reference is torch in float64 (the values here are moderate,
    so it rounds to torch's fp32 result), because torch's fp32 CPU gelu gives NaN at +inf
    (TORCH_CPU_ARTEFACTS)."""
    x = torch.tensor([[NAN, 1.0], [0.0, 0.0], [-3.0, 2.0], [INF, 0.0]], dtype=dtype, device=DEVICE)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=dtype, device=DEVICE)
    b = torch.tensor([0.0, NAN, 0.5], dtype=dtype, device=DEVICE)
    y = fb.linear_act(x, w, b, activation, negative_slope=slope, backend="triton")
    y_ref = torch_act(F.linear(x.double(), w.double(), b.double()), activation, slope).to(dtype)
    torch.testing.assert_close(y, y_ref, equal_nan=True, **TOL[dtype])
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().any()


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_nan_backward_matches_torch_backend(activation, slope, recompute):
    """Gradients with a NaN in x and in the incoming gradient: the same NaN pattern (and values
    elsewhere) as the torch backend, which applies dZ = dY * act'(.) the same way. (The incoming
    NaN sits where relu passes the gradient: from the sign mask, relu's dZ is 0 where the bit is
    clear even for a NaN dY, as threshold_backward; test_sign_mask_nan covers that.)"""
    grads = {}
    for backend in ("triton", "torch"):
        x, w, b = inputs(9, 6, 5, torch.float64, requires_grad=False)
        x[2, 3] = NAN
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
        g = grad_like((9, 5), torch.float64)
        z = F.linear(x, w, b).detach()
        row, col = (z > 0).nonzero()[0].tolist()
        g[row, col] = NAN
        y = fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=recompute, backend=backend)
        grads[backend] = (y, *torch.autograd.grad(y, (x, w, b), g))
    for got, want in zip(grads["triton"], grads["torch"]):
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, equal_nan=True, **TOL[torch.float64])


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_extremes_through_the_layer(activation, slope, dtype, recompute, path):
    """z = b exactly (x = 0) at the special values: the layer output and db = sum_m dY * act'(z)
    against torch's function and autograd (artefact points from float64, TORCH_CPU_ARTEFACTS), by
    every source of act' (y or z as kept, recomputed, the sign mask). -0 does not survive the
    GEMM (0 + -0 = +0), so it is left to test_formulas_on_special_values."""
    b = special_values(dtype)
    b = b[~((b == 0) & torch.signbit(b))]
    n = b.numel()
    x = torch.zeros((3, 4), dtype=dtype, device=DEVICE)
    w = torch.randn((n, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype).to(DEVICE)
    g = torch.ones((3, n), dtype=dtype, device=DEVICE)
    y, z = ops.linear_act_forward(x, w, b, activation, slope, return_preact=True)
    assert torch.equal(z, b.expand(3, n)) or torch.equal(z.isnan(), b.isnan().expand(3, n))
    y_ref, d_ref = torch_reference(b, activation, slope)
    assert_same_values(y, y_ref.expand(3, n), dtype)
    out = None if recompute else kept(y, z, activation, slope)
    if recompute and uses_sign_mask(activation, slope):
        out = sign_mask.pack_composite(y, activation)
    _, _, db = ops.linear_act_backward(g, x, w, b, out, activation, (False, False, True), slope)
    torch.testing.assert_close(db, 3 * d_ref, equal_nan=True, **TOL[dtype])


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


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["tanh", "gelu", "gelu_tanh", "silu"])
def test_smooth_extremes(activation, dtype, recompute):
    """Large |z| through the layer in every dtype (fp16: in its range): finite outputs and
    gradients, as torch computes them in float64."""
    big = 1e4 if dtype != torch.float16 else 6e4
    z = torch.tensor([[-big, big, -100.0, 100.0, -20.0, 20.0, 0.0]], dtype=dtype, device=DEVICE)
    x = z.clone().requires_grad_(True)
    w = torch.eye(7, dtype=dtype, device=DEVICE, requires_grad=True)
    y = fb.linear_act(x, w, None, activation, recompute=recompute, backend="triton")
    z64 = z.double().requires_grad_(True)
    y64 = torch_act(z64, activation)
    d64, = torch.autograd.grad(y64.sum(), z64)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y64.detach().to(dtype), **TOL[dtype])
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(x.grad, d64.to(dtype), **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile.
# ------------------------------------------------------------------------------------------------

def gradcheck_shape(activation, slope):
    """(M, K, N) for gradcheck, whose cost under the interpreter is one kernel launch per input
    element: the GRID_CASES at the larger shape, the other activations at a smaller one."""
    return (6, 5, 4) if (activation, slope) in [p.values for p in GRID_CASES] else (4, 3, 3)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_gradcheck(activation, slope, recompute, bias):
    x, w, b = inputs(*gradcheck_shape(activation, slope), torch.float64, bias=bias, requires_grad=True, seed=3)
    args = (x, w) if b is None else (x, w, b)

    def fn(x, w, b=None):
        return fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=recompute, backend="triton")

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_gradcheck_op_autograd(activation, slope):
    """The op-level autograd registered on triton_linear_act_fwd and triton_linear_act_fwd_preact
    (whose z output gets a gradient of its own)."""
    x, w, b = inputs(*gradcheck_shape(activation, slope), torch.float64, requires_grad=True, seed=4)
    for op in (torch.ops.fused_backprop.triton_linear_act_fwd, torch.ops.fused_backprop.triton_linear_act_fwd_preact):
        assert torch.autograd.gradcheck(lambda x, w, b, op=op: op(x, w, b, activation, slope), (x, w, b))


def _opcheck_fwd_samples():
    for param in ACT_CASES:
        activation, slope = param.values
        for bias in (True, False):
            for nc in (False, True):
                x, w, b = inputs(7, 5, 3, torch.float32, bias=bias, noncontiguous=nc, requires_grad=True)
                yield (x, w, b, activation, slope)


def _opcheck_bwd_samples():
    for param in ACT_CASES:
        activation, slope = param.values
        for recompute in (False, True):
            for mask in ([True, True, True], [True, False, True], [False, True, False]):
                for requires_grad in (False, True):
                    if requires_grad and mask != [True, True, True]:
                        continue
                    x, w, b = inputs(7, 5, 3, torch.float64, requires_grad=requires_grad)
                    out = None
                    if not recompute:
                        z = F.linear(x, w, b).detach()
                        out = kept(torch_act(z, activation, slope), z, activation, slope).requires_grad_(requires_grad)
                    g = grad_like((7, 3), torch.float64).requires_grad_(requires_grad)
                    yield (g, x, w, b, out, activation, mask, slope)
    x, w, _ = inputs(7, 5, 3, torch.float32, bias=False, noncontiguous=True)
    yield (grad_like((7, 3), torch.float32), x, w, None, None, "relu", [True, True, True], DEFAULT_SLOPE)
    for param in MASK_CASES[:3]:
        activation, slope = param.values
        for n in (3, 8):
            x, w, b = inputs(7, 5, n, torch.float32)
            packed = sign_mask.pack_composite(torch_act(F.linear(x, w, b), activation, slope), activation)
            yield (grad_like((7, n), torch.float32), x, w, b, packed, activation, [True, True, True], slope)


OPCHECK_FWD = list(_opcheck_fwd_samples())
OPCHECK_BWD = list(_opcheck_bwd_samples())


@pytest.mark.parametrize("i", range(len(OPCHECK_FWD)))
def test_opcheck_fwd(i):
    torch.library.opcheck(torch.ops.fused_backprop.triton_linear_act_fwd, OPCHECK_FWD[i])


@pytest.mark.parametrize("i", range(len(OPCHECK_FWD)))
def test_opcheck_fwd_preact(i):
    torch.library.opcheck(torch.ops.fused_backprop.triton_linear_act_fwd_preact, OPCHECK_FWD[i])


@pytest.mark.parametrize("i", range(len(OPCHECK_BWD)))
def test_opcheck_bwd(i):
    torch.library.opcheck(torch.ops.fused_backprop.triton_linear_act_bwd, OPCHECK_BWD[i])


def test_op_schemas_match_the_compiled_ops():
    """The Triton ops take the compiled ops' arguments (negative_slope trailing, default 0.01)."""
    for name in ("linear_act_fwd", "linear_act_fwd_preact", "linear_act_bwd"):
        schema = getattr(torch.ops.fused_backprop, "triton_" + name).default._schema
        args = schema.arguments
        assert args[-1].name == "negative_slope" and args[-1].default_value == DEFAULT_SLOPE
        assert len(schema.returns) == {"linear_act_fwd": 1, "linear_act_fwd_preact": 2, "linear_act_bwd": 3}[name]
        if hasattr(torch.ops.fused_backprop, name):
            compiled = getattr(torch.ops.fused_backprop, name).default._schema
            assert [a.name for a in compiled.arguments] == [a.name for a in args]


@pytest.mark.parametrize("activation,slope", [p for p in ACT_CASES if p.values[1] in (DEFAULT_SLOPE, -0.5)])
def test_compile_fused_mlp_fullgraph(activation, slope):
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = fb.FusedMLP([5, 8, 3], activation=activation, negative_slope=slope, backend="triton", device=DEVICE)
    ref = fb.FusedMLP([5, 8, 3], activation=activation, negative_slope=slope, backend="torch", device=DEVICE)
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

FP16_CASES = [pytest.param(*p.values, (37, 13, 11), id=f"{p.id}-M37K13N11") for p in ACT_CASES] + [
    pytest.param(*p.values, (130, 65, 33), id=f"{p.id}-M130K65N33") for p in GRID_CASES]


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("activation,slope,shape", FP16_CASES)
def test_fp16_parity(activation, slope, shape, recompute):
    """fp16 inputs, fp32 accumulation: against float64 math on the same fp16 values, with fp16
    tolerances (one rounding of the output, dZ rounded to fp16 before the backward GEMMs as the
    torch backend does; z kept in fp16 where backward takes act' from it)."""
    m, k, n = shape
    x, w, b = inputs(m, k, n, torch.float16, requires_grad=True)
    g = grad_like((m, n), torch.float16)
    y = fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=recompute, backend="triton")
    assert y.dtype == torch.float16
    grads = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = torch_act(F.linear(x64, w64, b64), activation, slope)
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
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_bf16_parity_gpu(activation, slope, recompute):
    x, w, b = sample_inputs(257, 130, 65, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    g = grad_like((257, 65), torch.bfloat16)
    y = fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=recompute, backend="triton")
    grads = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = torch_act(F.linear(x64, w64, b64), activation, slope)
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
            if role in ("dw", "dx"):
                assert red <= kernels.MAX_BLOCK_RED
    for key, tiles in kernels.UNALIGNED_TILES.items():
        assert tiles and set(tiles) <= set(kernels.TILES[key]), key
    for kernel, role in ((kernels._linear_act_forward_kernel, "fwd"),
                         (kernels._linear_act_backward_dz_kernel, "dz"),
                         (kernels._linear_act_backward_dx_kernel, "dx"),
                         (kernels._linear_act_backward_dw_kernel, "dw")):
        assert isinstance(kernel, kernels.Tuner)  # keyed on kernels.tune_key: tests/test_triton_launch.py
        for c in kernel.configs:
            assert set(kernels.ROLES[role]) | {"GROUP"} == set(c.kwargs)
        if INTERPRET:  # one config: the autotuner never benchmarks under the interpreter
            assert len(kernel.configs) == 1


def test_spill_table_names_real_configs_and_variants():
    """kernels.SPILLS (checked against ptxas by test_aot_compile_sm80_sm90_no_spills with
    FUSED_BACKPROP_AOT_ALL=1) names only configs the kernels have and variants the backend
    launches, and the narrow kernel's fallback follows it."""
    for (role, family, tile), variants in kernels.SPILLS.items():
        tiles = kernels.NARROW_TILES if role == "narrow" else kernels.TILES[(role, family)]
        assert tile in tiles and (role != "narrow" or family == "hopper"), (role, family, tile)
        assert variants <= {kernels.spill_variant(role, ce) for ce in kernels.launch_variants(role)}, variants
    for ce in kernels.launch_variants("narrow"):
        variant = kernels.spill_variant("narrow", ce)
        spill_everywhere = all(variant in kernels.SPILLS.get(("narrow", "hopper", t), ()) for t in kernels.NARROW_TILES)
        assert kernels.narrow_spill_free(ce["ACT"], ce["MODE"], ce.get("BYTE_ROWS", True)) != spill_everywhere
    assert kernels.spill_variant("fwd", dict(ACT=kernels.ACTIVATION_CODES["gelu"], STORE_PREACT=True)) == "gelu+z"
    assert kernels.spill_variant("dx", dict(ACT=0, MODE=kernels.MODE_RECOMPUTE.value)) == "dz"
    leaky_mask = dict(ACT=kernels.ACTIVATION_CODES["leaky_relu"], MODE=kernels.MODE_SIGN_MASK.value)
    assert kernels.spill_variant("dw", leaky_mask) == "leaky_relu:mask"
    assert kernels.spill_variant("dw", dict(leaky_mask, BYTE_ROWS=False)) == "leaky_relu:mask-bits"


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
        torch.ops.fused_backprop.triton_linear_act_fwd(x, w, b, "swish")
    with pytest.raises(ValueError, match="activation"):
        torch.ops.fused_backprop.triton_linear_act_fwd_preact(x, w, b, "gelu_erf")
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

# The helpers of the AOT compile (benchmarks/cuda_predict.py runs them too, read from this string).
AOT_HELPERS = r"""
import json, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_backprop.activations import NAMES
from fused_backprop.triton import kernels as K

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
ROLE = {"_linear_act_forward_kernel": "fwd", "_linear_act_backward_dz_kernel": "dz",
        "_linear_act_backward_dx_kernel": "dx", "_linear_act_backward_dw_kernel": "dw"}

def jit_fn(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k

# The int arguments of a launch on contiguous operands of this (M, N, K): a row stride is the row's
# length (kernels.ROW_STRIDES), every other stride 1 (a packed sign mask's are 0); one dX split.
def int_args(fn, shape, mask):
    M, N, K_ = shape
    out = dict(M=M, N=N, K=K_, rows_per_split=M, cols_per_split=-(-N // K.MAX_BLOCK_RED) * K.MAX_BLOCK_RED)
    for name in fn.arg_names:
        if name.startswith("stride_"):
            out[name] = (N * K_ if name == "stride_dws" else 0 if mask and name in ("stride_vm", "stride_vn")
                         else K_ if name in K.ROW_STRIDES["K"] else N if name in K.ROW_STRIDES["N"] else 1)
    return out

# The constexprs the kernel's triton.heuristics derive from these arguments (EVEN_K, ALIGN_K, ...).
def heuristics(kernel, named):
    out = {}
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        for name, f in getattr(kernel, "values", {}).items():
            out[name] = f({**named, **out})
        kernel = kernel.fn
    return out

LOAD = re.compile(r"ld\.global[\w.:]*?(?:\.v(\d))?\.[bsuf](8|16|32|64)\b")
CP_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+|\d+)")
# Instructions counted in the PTX (benchmarks/cuda_predict.py's Triton rates read them): FMAs,
# shared-memory loads to registers (and their bytes per thread), ldmatrix, mma.sync, and wgmma with
# A from shared memory (a descriptor after the accumulators) or from registers, and their N.
OPS = {"fma": r"\bfma\.rn\.f(?:32|64)\b", "ld_shared": r"\bld\.shared\b", "ldmatrix": r"\bldmatrix\b",
       "mma_sync": r"\bmma\.sync\b", "wgmma_ss": r"\bwgmma\.mma_async\S* \{[^}]*\}, %rd",
       "wgmma_rs": r"\bwgmma\.mma_async\S* \{[^}]*\}, \{"}
LD_SHARED = re.compile(r"\bld\.shared(?:\.v(\d))?\.[bsuf](8|16|32|64)\b")
WGMMA_N = re.compile(r"\bwgmma\.mma_async\.sync\.aligned\.m64n(\d+)k")

# Compile the kernel as a launch at this shape compiles it: Triton specialises an int argument that
# is 1 to a constant and one divisible by 16 with that divisibility, and the heuristics' constexprs
# come from the same values (the variant's own constexprs win: "mask-bits").
def compile_report(kernel, ptrs, constexprs, cfg, arch, shape):
    fn = jit_fn(kernel)
    ints = int_args(fn, shape, "u8" in ptrs.values())
    consts = {**constexprs, **cfg.kwargs}
    consts = {**heuristics(kernel, {**ints, **consts}), **consts}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "negative_slope":
            sig[name] = "fp64"
        elif ints[name] == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
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
    # the widths in bytes of the global loads to registers and of the cp.async copies to shared memory
    loads = {int(v or 1) * int(b) // 8 for v, b in LOAD.findall(ptx)}
    return dict(shared=c.metadata.shared, regs=max(int(v) for v in re.findall(r"Used (\d+) registers", out)),
                spill=sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", out)),
                tc="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma",
                loads=sorted(loads), cp_async=sorted({int(n, 0) for n in CP_ASYNC.findall(ptx)}),
                variant=K.spill_variant(ROLE.get(fn.__name__, "narrow"), consts),
                align=[consts["ALIGN_K"], consts["ALIGN_N"]],
                ops={name: len(re.findall(p, ptx)) for name, p in OPS.items()},
                ld_shared_bytes=sum(int(v or 1) * int(b) // 8 for v, b in LD_SHARED.findall(ptx)),
                wgmma_n=sorted({int(n) for n in WGMMA_N.findall(ptx)}))

def ptrs_of(role, dt, mask):
    v = "u8" if mask else dt
    return {"fwd": dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, out_ptr=dt, preact_ptr=dt),
            "dz": dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, dy_ptr=dt, dz_ptr=dt),
            "dx": dict(dy_ptr=dt, v_ptr=v, w_ptr=dt, dx_ptr=dt),
            "dw": dict(dy_ptr=dt, v_ptr=v, x_ptr=dt, dw_ptr="fp32", db_ptr="fp32"),
            "narrow": dict(dy_ptr=dt, v_ptr=v, x_ptr=dt, w_ptr=dt, b_ptr=dt, dx_ptr=dt, dw_ptr="fp32",
                           db_ptr="fp32")}[role]

FIXED = {"fwd": dict(HAS_BIAS=True), "dz": dict(HAS_BIAS=True), "dx": {}, "dw": dict(COMPUTE_DW=True, COMPUTE_DB=True),
         "narrow": dict(HAS_BIAS=True, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True)}
KERNEL = {"fwd": K._linear_act_forward_kernel, "dz": K._linear_act_backward_dz_kernel,
          "dx": K._linear_act_backward_dx_kernel, "dw": K._linear_act_backward_dw_kernel,
          "narrow": K._linear_act_backward_narrow_kernel}
"""

AOT_SCRIPT = AOT_HELPERS + r"""
every = sys.argv[1] == "all"
shapes = sys.argv[2].split(",")  # names of SHAPES to compile
only = sys.argv[3:]  # families to compile (default: all); "all" mode is split over processes this way
ODD_VARIANTS = 2  # of FIRST, compiled at the shapes other than div16
SMEM = {80: 163 * 1024, 90: 227 * 1024}
acc = {"bf16": tl.float32, "fp16": tl.float32, "fp32": tl.float32}
A = K.ACTIVATION_CODES
# Without FUSED_BACKPROP_AOT_ALL: the variants with the most registers per kind of launch, each at
# the first config the autotuner may pick for it. With it: every variant the backend launches at
# every config (what kernels.SPILLS is checked against).
FIRST = {"fwd": ["sigmoid", "gelu", "gelu_tanh+z"], "dz": ["sigmoid", "gelu_tanh"],
         "dx": ["sigmoid:output", "leaky_relu:mask", "leaky_relu:mask-bits", "gelu_tanh:preact"],
         "dw": ["sigmoid:output", "relu:mask", "relu:mask-bits", "gelu:preact"],
         "narrow": ["sigmoid:output", "gelu_tanh:recompute", "relu:mask", "leaky_relu:mask", "relu:mask-bits",
                    "gelu_tanh:preact"]}

# (M, N, K) of the launches compiled: every dimension a multiple of 16 (what kernels.SPILLS is
# measured on), K or N a multiple of 8 only (Triton's own specialisation sees neither), both odd.
SHAPES = {"div16": (4096, 4096, 4096), "k1000": (4096, 4096, 1000), "n1000": (4096, 1000, 4096),
          "odd": (4096, 1001, 999)}
NARROW_SHAPES = {"div16": (4096, 64, 64), "k1000": (4096, 64, 40), "n1000": (4096, 40, 64), "odd": (4096, 33, 17)}

def run(role, arch, family, dt, prec, shape_name):
    kernel = KERNEL[role]
    shape = (NARROW_SHAPES if role == "narrow" else SHAPES)[shape_name]
    configs = kernel.configs if role == "narrow" else [c for c in kernel.configs if K._FAMILY[id(c)] == family]
    variants = K.launch_variants(role)
    assert set(FIRST[role]) <= {K.spill_variant(role, ce) for ce in variants}, FIRST[role]
    first = FIRST[role] if shape_name == "div16" else FIRST[role][:ODD_VARIANTS]
    itemsize = 4 if dt == "fp32" else 2
    ints = int_args(jit_fn(kernel), shape, False)
    aligned = min(K.alignment(ints, "K"), K.alignment(ints, "N")) * itemsize >= 16
    for ce in variants:
        consts = {**FIXED[role], **ce, "ACC_DTYPE": acc[dt], "INPUT_PRECISION": prec}
        if role == "narrow":
            consts.update(BLOCK_N=max(16, K._next_pow2(shape[1])), BLOCK_K=max(16, K._next_pow2(shape[2])))
        variant = K.spill_variant(role, ce)
        if every:
            chosen = configs
        elif variant not in first:
            continue
        elif role == "narrow":  # the first config the autotuner's pruning leaves for the variant
            chosen = [c for c in configs if K.spill_free(role, family, K.config_tile(role, c), variant)][:1]
        else:
            tiles = K.prune_tiles(role, family, dict(zip("MNK", shape)), itemsize, variant, 1, SMEM[arch],
                                  aligned=aligned)
            chosen = [c for c in configs if K.config_tile(role, c) == tiles[0]]
        for cfg in chosen:
            rep = compile_report(kernel, ptrs_of(role, dt, ce.get("MODE") == K.MODE_SIGN_MASK.value), consts, cfg,
                                 arch, shape)
            print(json.dumps(dict(rep, role=role, kernel=jit_fn(kernel).__name__, arch=arch, family=family, dtype=dt,
                                  tile=K.config_tile(role, cfg), shape=shape_name)), flush=True)

for shape_name in shapes:
    for arch, family, dt, prec in ((80, "ampere", "bf16", "tf32"), (90, "hopper", "bf16", "tf32"),
                                   (80, "fma", "fp32", "ieee"), (90, "fma", "fp32", "ieee")):
        if only and family not in only:
            continue
        for role in ("fwd", "dz", "dx", "dw"):
            run(role, arch, family, dt, prec, shape_name)
        if family == "hopper":  # the single-pass narrow backward: used on sm_90 for 16-bit inputs only
            run("narrow", 90, "hopper", "bf16", "tf32", shape_name)
"""


# The spills the first-config compiles still show (bytes): two fp32 FMA launches whose first
# spill-free config at the div16 shapes (kernels.SPILLS) spills 8 bytes with a masked K or N edge.
AOT_KNOWN_SPILLS = {("k1000", 80, "fma", "dz", "gelu_tanh", (64, 64, 32, 4, 3)): 8,
                    ("odd", 90, "fma", "dx", "leaky_relu:mask-bits", (64, 64, 32, 4, 3)): 8}


@pytest.mark.skipif(not INTERPRET and torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_aot_compile_sm80_sm90_no_spills():
    """The kernels compile for sm_80 and sm_90 within the shared memory of an A100 / H100, on
    tensor cores for bf16 (mma.sync on sm_80, wgmma on sm_90), and with no register spills at the
    first config the autotuner may pick for the heaviest launch variants (the single-pass narrow
    backward likewise for sm_90 bf16, the only place it runs on a GPU), at every shape of SHAPES:
    all dimensions multiples of 16, K = 1000 or N = 1000 (multiples of 8 only: what Triton's own
    specialisation misses; the kernels' ALIGN_K / ALIGN_N), and K, N odd (UNALIGNED_TILES). Where
    K and N are multiples of 8, every operand copy to shared memory is a 16-byte cp.async; where
    they are odd, rows cannot be copied 16 bytes at a time and there is no cp.async. With
    FUSED_BACKPROP_AOT_ALL=1: every variant at every config, and kernels.SPILLS names exactly the
    (config, variant) pairs that spill (the message prints the table when it does not); every
    variant keeps a spill-free config in each family (the narrow kernel: or the backend does not
    run it, ``narrow_spill_free``)."""
    import json
    import subprocess
    import sys

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    every = os.environ.get("FUSED_BACKPROP_AOT_ALL") == "1"
    groups = [["ampere"], ["hopper"], ["fma"]] if every else [[]]
    shapes = "div16" if every else "div16,k1000,n1000,odd"
    procs = [subprocess.Popen([sys.executable, "-c", AOT_SCRIPT, "all" if every else "first", shapes, *families],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for families in groups]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        assert proc.returncode == 0, err[-3000:]
        reports += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(reports) >= (1000 if every else 150)
    limit = {80: 163 * 1024, 90: 227 * 1024}
    for r in reports:
        assert r["shared"] <= limit[r["arch"]], r
        assert r["tc"] == ("fma" if r["family"] == "fma" else "wgmma" if r["arch"] == 90 else "mma"), r
    if not every:
        assert {r["shape"] for r in reports} == {"div16", "k1000", "n1000", "odd"}
        spilled = {}
        for r in reports:
            if r["spill"]:
                spilled[(r["shape"], r["arch"], r["family"], r["role"], r["variant"], tuple(r["tile"]))] = r["spill"]
            itemsize = 4 if r["dtype"] == "fp32" else 2
            if min(r["align"]) * itemsize >= 16:
                assert r["cp_async"] == [16], r   # every copy to shared memory 16 bytes wide
            elif r["shape"] == "odd":
                assert 16 not in r["cp_async"] and (itemsize == 4 or r["cp_async"] == []), r
        assert spilled == AOT_KNOWN_SPILLS
        return
    spills = {}
    for r in reports:
        if r["spill"]:
            spills.setdefault((r["role"], r["family"], tuple(r["tile"])), set()).add(r["variant"])
    found = {key: frozenset(v) for key, v in spills.items()}
    table = "".join(f"    {key!r}:\n        frozenset({sorted(v)!r}),\n" for key, v in sorted(found.items()))
    assert found == kernels.SPILLS, "kernels.SPILLS should be:\n{\n" + table + "}"
    for role in ("fwd", "dz", "dx", "dw"):
        for family in ("ampere", "hopper", "fma"):
            for ce in kernels.launch_variants(role):
                v = kernels.spill_variant(role, ce)
                tiles = kernels.TILES[(role, family)]
                assert any(kernels.spill_free(role, family, t, v) for t in tiles), (role, family, v)
