"""The C++ call path (csrc/call_path.cpp): which calls take it, and that they behave exactly as the
Python path (``functional._no_call_path`` forces that one): outputs, gradients, double backward,
what backward keeps, autocast, errors. No timings here (speed: ``python -m fused_backprop.bench
--latency``)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ACT_CASES, saved_tensors
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fused_backprop as fb
from fused_backprop import functional

NODE = "FusedLinearActBackward"


def fast_node(out):
    """The fused node behind ``out`` (through the reshape of a non-2-D input), or None."""
    fn = out.grad_fn
    if fn is not None and fn.name() != NODE and fn.next_functions:
        fn = fn.next_functions[0][0]
    return fn if fn is not None and fn.name() == NODE else None


def inputs(shape=(5, 4), n=3, dtype=torch.float64, bias=True):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    w = torch.randn(n, shape[-1], dtype=dtype, requires_grad=True)
    b = torch.randn(n, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


@pytest.fixture
def python_path(monkeypatch):
    """Runs the body on the Python path alone."""
    def use():
        monkeypatch.setattr(functional, "_call_path", functional._no_call_path)
    return use


def run_both(python_path, fn):
    """fn() on the C++ call path, then on the Python path."""
    fast = fn()
    python_path()
    return fast, fn()


def test_plain_calls_take_it():
    x, w, b = inputs()
    assert fast_node(fb.linear_act(x, w, b)) is not None
    assert fast_node(fb.linear_sigmoid(x, w, None, recompute=True)) is not None
    assert fast_node(fb.linear_act(x, w, b, "gelu", backend="cpu")) is not None
    assert fast_node(fb.linear_act(x[0], w, b)) is not None  # 1-D
    assert fast_node(fb.linear_act(x.view(5, 1, 4), w, b)) is not None  # 3-D
    layer = fb.FusedLinearReLU(4, 3, dtype=torch.float64)
    assert fast_node(layer(x)) is not None
    assert fast_node(fb.linear_act(x.detach(), w.detach(), b)) is not None  # only the bias needs grad
    with torch.no_grad():
        assert fb.linear_act(x, w, b).grad_fn is None
    with torch.inference_mode():
        assert not fb.linear_act(x, w, b).requires_grad


class Subclass(torch.Tensor):
    pass


class FunctionModeThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class DispatchModeThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_other_calls_take_the_python_path():
    x, w, b = inputs()
    assert fast_node(fb.linear_act(x, w, b, backend="torch")) is None  # an explicit other backend
    assert fast_node(fb.linear_act(x.as_subclass(Subclass), w, b)) is None
    with FunctionModeThrough():
        assert fast_node(fb.linear_act(x, w, b)) is None
    with DispatchModeThrough():
        assert fast_node(fb.linear_act(x, w, b)) is None
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        assert type(fb.linear_act(x, w, b).grad_fn).__name__ == "LinearActFunctionBackward"
    seen = []
    torch.func.vmap(lambda x_: seen.append(fb.linear_act(x_, w, b)) or seen[-1])(x.detach().view(5, 1, 4))
    torch.func.grad(lambda x_: seen.append(fb.linear_act(x_, w, b)) or seen[-1].sum())(x.detach())
    # inside a transform the outputs are wrapped: the fused node never appears on them
    assert all(fast_node(t) is None for t in seen)
    # the C++ entry itself declines, returning None, for what it does not serve
    C = fb._ops._C
    assert C.linear_act(x.to("meta"), w.to("meta"), None, "relu", 0.01, False, "auto") is None
    assert C.linear_act(x, w, b, "relu", 0.01, False, "numpy") is None
    assert C.linear_act(x, w, b, "swish", 0.01, False, "auto") is None
    assert C.linear_act(x, w, b, "relu", True, False, "auto") is None  # a bool slope: TypeError's to raise
    assert C.linear_act(x, w, b, "relu", 0.01, 1, "auto") is None  # recompute not a bool
    assert C.linear_act(x.tolist(), w, b, "relu", 0.01, False, "auto") is None
    assert C.linear_act(x, w.float(), b, "relu", 0.01, False, "auto") is None
    assert C.linear_act(x, w[:, :3], b, "relu", 0.01, False, "auto") is None


@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("shape,bias", [((5, 4), True), ((2, 3, 4), False), ((4,), True), ((0, 4), True)])
def test_same_results_as_python_path(python_path, activation, slope, recompute, shape, bias):
    """Outputs, gradients and double-backward gradients bit for bit, and what is kept for backward."""
    x, w, b = inputs(shape, bias=bias)
    leaves = [t for t in (x, w, b) if t is not None]

    def step():
        saved, outs = [], []
        saved += saved_tensors(lambda: outs.append(fb.linear_act(x, w, b, activation, negative_slope=slope,
                                                                 recompute=recompute)))
        y = outs[0]
        grads = torch.autograd.grad((y * y.detach().cos()).sum(), leaves, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves, allow_unused=True)
        return y, grads, second, [(t.dtype, t.shape) for t in saved], fast_node(y) is not None

    fast, slow = run_both(python_path, step)
    assert fast[4] and not slow[4]
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=0)
    for a, e in zip(fast[1] + fast[2], slow[1] + slow[2]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert fast[3] == slow[3]


def test_gradcheck_and_gradgradcheck():
    x, w, b = inputs()
    for activation in ("relu", "tanh", "gelu"):
        f = lambda x, w, b: fb.linear_act(x, w, b, activation)  # noqa: E731
        assert fast_node(f(x, w, b)) is not None
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_autocast(python_path):
    """Under CPU autocast the layer computes in bfloat16 as nn.Linear does; the gradients reach the
    float32 leaves in float32."""
    x, w, b = inputs(dtype=torch.float32)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fb.linear_act(x, w, b, "silu")
        assert y.dtype == torch.bfloat16
        grads = torch.autograd.grad(y.float().sum(), (x, w, b))
        assert all(g.dtype == torch.float32 for g in grads)
        return y, grads, y.grad_fn.name() == NODE

    fast, slow = run_both(python_path, step)
    assert fast[2] and not slow[2]
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=0)
    for a, e in zip(fast[1], slow[1]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_autograd_errors_and_retain_graph():
    x, w, b = inputs()
    y = fb.linear_relu(x, w, b)
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    y = fb.linear_relu(x, w, b)
    y.add_(1)  # the output is kept for backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_errors_come_from_the_python_checks():
    x, w, b = inputs()
    with pytest.raises(ValueError, match=r"input must have shape \(\*, in_features=4\)"):
        fb.linear_relu(torch.randn(5, 6, dtype=x.dtype), w, b)
    with pytest.raises(TypeError, match="negative_slope must be a float"):
        fb.linear_act(x, w, b, "leaky_relu", negative_slope=True)
    with pytest.raises(TypeError, match="bias must have the same dtype as input"):
        fb.linear_act(x, w, b.float())
    with pytest.raises(OverflowError):  # float(negative_slope), as the Python path has always raised
        fb.linear_act(x, w, b, "leaky_relu", negative_slope=10 ** 400)


def test_compile_traces_the_registered_ops():
    """torch.compile traces the Python path (the C++ entry would break the graph)."""
    layer = fb.FusedLinearGELU(4, 3, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, F.gelu(F.linear(x, layer.weight, layer.bias)))
    (gx,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(F.gelu(F.linear(x, layer.weight, layer.bias)).sum(), x)
    torch.testing.assert_close(gx, want)
