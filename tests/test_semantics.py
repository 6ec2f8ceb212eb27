"""The numerical contract: every activation matches torch's own function on NaN, ±inf, ±0, ±1e38
and large |z| (forward and gradients, every dtype), within a measured ULP bound in float32,
relu'(0) = 0 and leaky_relu'(0) = negative_slope, sigmoid stays finite at the extremes, empty
inputs give empty outputs and zero parameter gradients."""

import mpmath
import pytest
import torch
from helpers import ACT_CASES, TOL, TORCH_FUNCTIONS, dtype_id, layer_grads, torch_layer

import fused_backprop as fb

BACKENDS = [b for b in fb.available_backends("cpu") if b != "triton"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def fused(activation, slope, recompute, backend):
    return lambda *a: fb.linear_act(*a, activation, negative_slope=slope, recompute=recompute, backend=backend)


def oracle(activation, slope, backend, dtype=None):
    """torch's own layer at the inputs' dtype; torch's in float64 rounded to the inputs' dtype for
    the numpy backend, which computes in float64 and rounds, and for the cpu kernels' gelu below
    float64: torch's vectorised CPU gelu gives NaN at z = +inf and inf at 3.3e38 (its erf
    polynomial; its scalar path and float64 give inf and 3.3e38, the values of the formula, which
    the kernels keep; the torch backend calls F.gelu and has torch's). Which of its paths float16
    takes depends on the CPU: the vectorised one on an Intel Xeon with AVX512-FP16, the scalar one
    on AMD EPYC Zen 5."""
    layer = torch_layer(activation, slope)
    if backend != "numpy" and not (backend == "cpu" and activation == "gelu" and dtype != torch.float64):
        return layer
    return lambda x, w, b: layer(x.double(), w.double(), None if b is None else b.double()).to(x.dtype)


def assert_same_values(got, want, dtype):
    """Close within the dtype's tolerance, NaN exactly where torch has NaN, equal infinities."""
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, equal_nan=True, **TOL[dtype])
        assert torch.equal(a.isnan(), e.isnan())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_nan_propagates_like_torch(backend, activation, slope, recompute, dtype):
    # 20 columns so that the NaNs sit in both SIMD bodies and tails.
    x = torch.randn(5, 20, dtype=dtype)
    x[1, 3] = float("nan")
    w = torch.eye(20, dtype=dtype)
    w[7, 7] = float("nan")
    b = torch.zeros(20, dtype=dtype)
    b[11] = float("nan")
    g = torch.randn(5, 20, dtype=dtype)
    got = layer_grads(fused(activation, slope, recompute, backend), x, w, b, g)
    want = layer_grads(torch_layer(activation, slope), x, w, b, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, equal_nan=True)
        assert torch.equal(a.isnan(), e.isnan())


# Pre-activations at the edges: signed zeros, infinities, NaN, the float32 extremes, values where
# exp(±z) over- or underflows in float32 (89, 104) and float64 (710, 800), tanh and sigmoid
# saturate (9, 20), 1 + erf(z/√2) cancels (-5.5), subnormals, and two ordinary values.
EXTREMES = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e38, -1e38, 3.3e38, -3.3e38, 1e4, -1e4, 800.0,
            -800.0, 710.0, -710.0, 104.0, -104.0, 89.0, -89.0, 20.0, -20.0, 9.0, -9.0, 5.5, -5.5, 1e-30, -1e-30,
            1e-40, -1e-40, 0.5, -0.75]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy reference: inf * 0, overflow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_extreme_pre_activations_match_torch(backend, activation, slope, recompute, dtype):
    """Row i of the pre-activation holds EXTREMES[i] (rounded to the dtype) in all 19 columns
    (SIMD bodies and tails): z = x @ 1ᵀ with x a column, exactly. dx[i] = Σ_j g act'(z_i) is act'
    of one value; dW and db mix the rows and are compared too."""
    x = torch.tensor(EXTREMES, dtype=torch.float64).to(dtype)[:, None]
    w, b = torch.ones(19, 1, dtype=dtype), torch.zeros(19, dtype=dtype)
    g = torch.ones(len(EXTREMES), 19, dtype=dtype)
    got = layer_grads(fused(activation, slope, recompute, backend), x, w, b, g)
    want = layer_grads(oracle(activation, slope, backend, dtype), x, w, b, g)
    assert_same_values(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True])
def test_relu_derivative_at_zero_is_zero(backend, recompute):
    x = torch.zeros(3, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(19, 17, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(19, dtype=torch.float64, requires_grad=True)
    y = fb.linear_relu(x, w, b, recompute=recompute, backend=backend)
    y.backward(torch.ones_like(y))
    assert not y.any() and not x.grad.any() and not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("slope", [0.01, 0.0, -0.5, 1.5])
def test_leaky_relu_derivative_at_zero_is_the_slope(backend, recompute, slope):
    """leaky_relu'(0) = negative_slope, as F.leaky_relu's backward (z = 0 exactly: x = 0, b = 0)."""
    x = torch.zeros(3, 17, dtype=torch.float64)
    w = torch.randn(19, 17, dtype=torch.float64)
    b = torch.zeros(19, dtype=torch.float64)
    g = torch.ones(3, 19, dtype=x.dtype)
    y, dx, dw, db = layer_grads(fused("leaky_relu", slope, recompute, backend), x, w, b, g)
    assert not y.any() and not dw.any()
    assert torch.equal(db, torch.full_like(db, 3 * slope))
    torch.testing.assert_close(dx, slope * w.sum(0).expand(3, 17), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_sigmoid_finite_at_extremes(backend, recompute, dtype):
    z = torch.tensor([-1e4, -800.0, -100.0, 0.0, 100.0, 800.0, 1e4], dtype=torch.float64)
    x = z.to(dtype).repeat(3, 3)[:, :19].contiguous()  # 3 x 19: body and tail lanes
    w = torch.eye(19, dtype=dtype)
    b = torch.zeros(19, dtype=dtype)
    g = torch.ones(3, 19, dtype=dtype)
    got = layer_grads(lambda *a: fb.linear_sigmoid(*a, recompute=recompute, backend=backend), x, w, b, g)
    want = layer_grads(lambda *a: torch.sigmoid(torch.nn.functional.linear(*a)), x, w, b, g)
    for a, e in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_float32_accuracy(backend):
    """float32 sigmoid within 3 ULP of float64 (torch.sigmoid: 2.35) over a dense sweep of the
    pre-activation, wherever the result is a normal float (below that, 1 / (1 + e^-z) flushes to 0
    once e^-z overflows, as torch.sigmoid does); the kernels' derivative recomputed from z equals
    the one from the saved output. The CPU kernel's own exp must be as accurate as torch's."""
    z = torch.cat([torch.linspace(-88, 90, 200_000), torch.linspace(-1, 1, 50_001)])
    x = z.reshape(-1, 1)  # z = x exactly: weight 1, bias 0
    w, b = torch.ones(1, 1), torch.zeros(1)
    y, dx, _, _ = layer_grads(lambda *a: fb.linear_sigmoid(*a, backend=backend), x, w, b, torch.ones_like(x))
    want = torch.sigmoid(z.double())
    ulp = torch.nextafter(want.float(), torch.tensor(float("inf"))) - want.float()
    err = (y.flatten().double() - want).abs() / ulp.double()
    assert err.max() <= 3, f"max error {err.max():.2f} ULP at z = {z[err.argmax()].item()}"
    y_r, dx_r, _, _ = layer_grads(lambda *a: fb.linear_sigmoid(*a, recompute=True, backend=backend), x, w, b,
                            torch.ones_like(x))
    assert torch.equal(y_r, y)
    if backend != "numpy":  # the NumPy reference recomputes σ'(z) as e / (1 + e)², not from y
        assert torch.equal(dx_r, dx)


# The float32 sweep of the ULP test: z in [-30, 30] and, denser, in [-1, 1]; 64 columns, so
# every value runs in the SIMD body (z = x @ I exactly).
_SWEEP = torch.cat([torch.linspace(-30, 30, 200_000), torch.linspace(-1, 1, 40_000)])
_SWEEP = torch.cat([_SWEEP, torch.zeros(-_SWEEP.numel() % 64)]).reshape(-1, 64)

# Largest float32 error of the CPU kernels, in ULP, measured on the sweep at each SIMD level (AMD
# EPYC; AVX512 / AVX2 / DEFAULT, the last on csrc/cpu/portable_math.h's exp and erf), as (forward
# against torch's float32 function, forward against float64, act' against torch's float32
# autograd, act' against float64); act' from what
# backward keeps and recomputed are the same. An ULP is that of the exact value, or that of 2^-10
# where the value is smaller: near 0 the absolute error of these formulas is set by their O(1)
# terms (1 + erf(z/√2), 1 + tanh(u), 1 - y², y (1 - y)), in torch as in the kernels, and an ULP
# of a tiny value would only measure that cancellation.
#   activation   AVX512                           AVX2                           DEFAULT
#   relu         0 / 0 / 0 / 0                    the same                       the same
#   leaky_relu   0 / 0.84 / 0 / 0.24 (slope 0.01; 0 and -0.5: all 0; 1.5: 0 / 0.5 / 0 / 0), every level
#   sigmoid      2 / 1.957 / 1023 / 757.7         2 / 1.957 / 509 / 757.7        2 / 1.886 / 5 / 754.5
#   tanh         1 / 1.299 / 1024 / 512.7         the same                       1 / 1.299 / 1024 / 756.4
#   gelu         9414 / 2146.8 / 768 / 1326.4     the same                       8055.5 / 709.1 / 1152 / 383.7
#   gelu_tanh    1320.4 / 659.8 / 9370.2 / 4682.4 the same                       176 / 659.8 / 512 / 4682.4
#   silu         2 / 1.902 / 141.5 / 111.2        2 / 1.836 / 72 / 105.0         2 / 1.836 / 12 / 160.0
# torch's own float32 functions against float64 on the same sweep (forward / act'), AVX512:
# sigmoid 1.878 / 757.7, tanh 0.513 / 525.1, gelu 9403.7 / 1027.3, gelu_tanh 1294.9 / 8911.6,
# silu 1.836 / 105.0 (DEFAULT: gelu 7837.6 / 1138.2, gelu_tanh 659.8 / 4682.4). The kernels' own
# tanh (csrc/cpu/rowwise.h, not Sleef's) is 1.3 ULP from float64 against torch's 0.51; their
# gelu_tanh is closer to float64 than torch's at AVX2/AVX512 (660 / 4682 against 1295 / 8912), and
# their gelu forward too (2147 against 9404): all of the distance to torch there is torch's. act'
# of sigmoid and tanh comes from the output y (one ULP of y near saturation moves 1 - y² by ~1000
# ULP of it), in torch as in the kernels. The bounds: the largest of the three levels, rounded up.
ULP_BOUNDS = {
    "relu": (0, 0, 0, 0),
    "sigmoid": (2, 1.96, 1023, 758),
    "tanh": (1, 1.30, 1024, 757),
    "leaky_relu": (0, 0.841, 0, 0.241),
    "gelu": (9414, 2147, 1152, 1327),
    "gelu_tanh": (1321, 660, 9371, 4683),
    "silu": (2, 1.91, 142, 160),
}
_ULP_FLOOR = 2.0 ** -10


def _ulps(want64, dtype):
    """The ULP of `dtype` at each value of want64 (or at _ULP_FLOOR below it), in float64."""
    scale = want64.abs().clamp_min(_ULP_FLOOR).to(dtype)
    return (torch.nextafter(scale, torch.tensor(float("inf"), dtype=dtype)) - scale).double()


def _ulp_error(got, want64, dtype=torch.float32):
    """Largest |got - want64| in ULP of `dtype` (of the exact value, or of _ULP_FLOOR below it)."""
    return ((got.double() - want64).abs() / _ulps(want64, dtype)).max().item()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "numpy")])
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_float32_ulp_error(backend, activation, slope):
    """The float32 forward and act' (dx with weight I and grad_out 1) over a dense sweep, against
    torch's own float32 function and autograd, and against float64: the CPU kernels within
    ULP_BOUNDS, with act' from what backward keeps and recomputed; the NumPy reference, computed
    in float64 (act' from z, recomputed), within 0.5 ULP of float64: the rounding to float32."""
    x, w, b = _SWEEP, torch.eye(64), torch.zeros(64)
    ones = torch.ones_like(x)
    y, dx, _, _ = layer_grads(fused(activation, slope, backend == "numpy", backend), x, w, b, ones)
    act = TORCH_FUNCTIONS[activation]
    z32, z64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    y32, y64 = act(z32, slope), act(z64, slope)
    d32, d64 = (torch.autograd.grad(v, z, torch.ones_like(v))[0] for v, z in ((y32, z32), (y64, z64)))
    errors = (_ulp_error(y, y32.detach().double()), _ulp_error(y, y64.detach()), _ulp_error(dx, d32.double()),
              _ulp_error(dx, d64))
    if backend == "numpy":
        assert max(errors[1], errors[3]) <= 0.5 + 1e-6, errors
    else:
        _, dx_r, _, _ = layer_grads(fused(activation, slope, True, backend), x, w, b, ones)
        errors += (_ulp_error(dx_r, d32.double()), _ulp_error(dx_r, d64))
        names = ("forward vs torch", "forward vs float64", "act' vs torch", "act' vs float64",
                 "recomputed act' vs torch", "recomputed act' vs float64")
        for name, err, bound in zip(names, errors, ULP_BOUNDS[activation] + ULP_BOUNDS[activation][2:]):
            assert err <= bound, f"{activation} {name}: {err:.4g} ULP > {bound} at {fb.cpu_capability()}"


# The same sweep in float64 against torch's float64 function and autograd, in float64 ULP (forward,
# act'), measured on AMD EPYC: at AVX2 and AVX512 (at::vec's Sleef, as torch) 0 / 0 but tanh
# 1 / 1024 and gelu, gelu_tanh 0 / 64; at DEFAULT (csrc/cpu/portable_math.h's exp, erf and tanh, 1.1,
# 0.98 and 1.5 ULP from the exact value, against libm's in torch) the bounds below. The large ones
# are the cancellations of the float32 table's note (1 + erf(z/√2) for z << 0, 1 - t² as t → 1), where
# torch's own float64 is as far from the exact value (gelu_tanh' at z = 7.18: ours 3.1e-15, torch's 2.0e-15).
ULP_BOUNDS_64 = {"relu": (0, 0), "sigmoid": (2, 253), "tanh": (1, 1024), "leaky_relu": (0, 0), "gelu": (1149, 258),
                 "gelu_tanh": (1844, 23139), "silu": (2, 220)}


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_float64_ulp_error(activation, slope):
    """The cpu kernels' float64 forward and act' over the sweep within ULP_BOUNDS_64 of torch's."""
    x, w, b = _SWEEP.double(), torch.eye(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    y, dx, _, _ = layer_grads(fused(activation, slope, False, "cpu"), x, w, b, torch.ones_like(x))
    z = x.clone().requires_grad_(True)
    want = TORCH_FUNCTIONS[activation](z, slope)
    dwant = torch.autograd.grad(want, z, torch.ones_like(want))[0]
    errors = (_ulp_error(y, want.detach(), torch.float64), _ulp_error(dx, dwant, torch.float64))
    for name, err, bound in zip(("forward", "act'"), errors, ULP_BOUNDS_64[activation]):
        if name == "forward" and err > bound:  # then within bound of the correctly rounded value
            name, err, bound = ("forward from the exact value", _ulp_error_from_exact(y, x, want.detach(), activation, slope,
                                                                                      bound), bound + 0.5)
        if name == "act'" and err > bound and activation in _BACKWARD_FROM_OUTPUT:  # torch's formula at our y
            name, err = "act' from the output", _ulp_error(dx, _BACKWARD_FROM_OUTPUT[activation](torch.ones_like(y), y),
                                                           torch.float64)
        assert err <= bound, f"{activation} float64 {name}: {err:.4g} ULP > {bound} at {fb.cpu_capability()}"


# Each activation in arbitrary precision, for the float64 forward where torch's value is not the
# correctly rounded one: at DEFAULT torch's float64 tanh is libm's, which is 1 ULP apart on an Intel
# Xeon and on AMD EPYC at some points (at z = -5.575077056884766 libm 0.52 ULP from the exact
# value on the Xeon; csrc/cpu/portable_math.h's 1.48, on the other side).
_EXACT = {"relu": lambda z, a: max(z, 0), "leaky_relu": lambda z, a: z if z >= 0 else a * z,
          "sigmoid": lambda z, a: 1 / (1 + mpmath.exp(-z)), "tanh": lambda z, a: mpmath.tanh(z),
          "gelu": lambda z, a: z * (1 + mpmath.erf(z / mpmath.sqrt(2))) / 2,
          "gelu_tanh": lambda z, a: z * (1 + mpmath.tanh(mpmath.sqrt(2 / mpmath.pi) * (z + 0.044715 * z ** 3))) / 2,
          "silu": lambda z, a: z / (1 + mpmath.exp(-z))}


# act' from the saved output, as torch's autograd forms it from its own: where torch's float64
# output differs from the kernels' (above), so does its act' (1 - y² at y -> 1 by 2048 ULP of
# act' for a 2-ULP difference of y at DEFAULT on the Xeon).
_BACKWARD_FROM_OUTPUT = {"tanh": torch.ops.aten.tanh_backward, "sigmoid": torch.ops.aten.sigmoid_backward}


def _ulp_error_from_exact(y, z, want, activation, slope, bound):
    """Largest float64 ULP error of y = act(z) from the exact value at the points where y is more
    than ``bound`` ULP from ``want``, torch's float64 act(z) (computed in 100-bit arithmetic)."""
    ulp = _ulps(want, torch.float64)
    far = ((y - want).abs() / ulp > bound).nonzero()
    with mpmath.workprec(100):
        return max(float(abs(mpmath.mpf(y[i, j].item()) - _EXACT[activation](mpmath.mpf(z[i, j].item()), slope)))
                   / ulp[i, j].item() for i, j in far.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_empty_inputs(backend, activation, slope):
    w = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    for recompute in (False, True):
        for shape in [(0, 5), (2, 0, 5)]:
            x = torch.randn(*shape, requires_grad=True)
            y = fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=recompute, backend=backend)
            assert y.shape == (*shape[:-1], 3)
            y.sum().backward()
            assert x.grad.shape == x.shape
            assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
            w.grad = b.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_zero_in_features_is_the_bias(backend, activation, slope):
    """in_features = 0 (allowed by nn.Linear): the output is act(b) and only b gets a gradient."""
    x = torch.randn(4, 0, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = fb.linear_act(x, w, b, activation, negative_slope=slope, backend=backend)
    bt = b.detach().clone().requires_grad_(True)
    act_b = TORCH_FUNCTIONS[activation](bt, slope)
    torch.testing.assert_close(y, act_b.detach().expand(4, 3))
    y.sum().backward()
    act_b.backward(torch.full_like(act_b, 4.0))
    torch.testing.assert_close(b.grad, bt.grad)
    assert w.grad.shape == (3, 0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("activation", ["relu", "gelu"])  # the output kept; the pre-activation kept
@pytest.mark.parametrize("path", ["C++", "Python"])  # functional.py's call paths
def test_only_needed_gradients_are_computed(monkeypatch, activation, path):
    """The kernel is asked only for the gradients autograd needs (no dX GEMM for an input that
    needs no grad, no dW/db for frozen parameters): the output_mask the profiler sees
    linear_act_bwd called with."""
    if path == "Python":
        monkeypatch.setattr(fb.functional, "_call_path", fb.functional._no_call_path)
    for needs, want in [((False, True, False), (False, True, False)), ((True, False, False), (True, False, False)),
                        ((False, False, True), (False, False, True)), ((True, True, True), (True, True, True))]:
        x, w, b = (torch.randn(*s).requires_grad_(r) for s, r in zip([(6, 4), (3, 4), (3,)], needs))
        y = fb.linear_act(x, w, b, activation, backend="cpu")
        with torch.profiler.profile(record_shapes=True) as prof:
            y.sum().backward()
        masks = [tuple(e.concrete_inputs[6]) for e in prof.events() if e.name == "fused_backprop::linear_act_bwd"]
        assert masks == [want]
        assert [t.grad is not None for t in (x, w, b)] == list(needs)
