"""torch.func on the fused layers: every transform (grad, vjp, vmap, jvp, jacrev, jacfwd, hessian,
functional_call, stack_module_state ensembles) and their nestings against the same computation
written with F.linear + torch's own activation; gradcheck with forward-mode AD and batched
gradients, gradgradcheck, third order; the fused second-order kernels against their composite
forms; the vmap rules of the registered ops; and that the fused paths are the ones that run.

Float64, small odd shapes with leading dims; vmap runs with torch's per-sample fallback loop
switched off, so a missing batching rule fails instead of looping."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, sample_inputs
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap

import fused_backprop as fb
from fused_backprop import func
from fused_backprop.backends import torch_backend

BACKENDS = [b for b in ("cpu", "torch") if b in fb.available_backends("cpu")]
ACTIVATIONS = fb.ACTIVATIONS
SLOPE = 0.2  # leaky relu's (the others ignore it)
# torch's own functions: the reference every transform is checked against
TORCH_ACT = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
             "leaky_relu": lambda z: F.leaky_relu(z, SLOPE), "gelu": F.gelu,
             "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu}
ALL3 = (0, 1, 2)


@pytest.fixture(autouse=True)
def no_vmap_fallback():
    """A vmap that would fall back to a per-sample loop raises instead."""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(before)


def fused(activation, backend, recompute=False):
    return lambda x, w, b: fb.linear_act(x, w, b, activation, negative_slope=SLOPE, recompute=recompute,
                                         backend=backend)


def eager(activation):
    return lambda x, w, b: TORCH_ACT[activation](F.linear(x, w, b))


def close(actual, expected, dtype=torch.float64):
    """Same pytree of tensors, equal within dtype's tolerance, its absolute part scaled by the
    largest expected value (a float32 sum of many terms is off by a few ULP of the largest)."""
    a, e = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    assert len(a) == len(e)
    for u, v in zip(a, e):
        tol = dict(TOL[dtype])
        tol["atol"] *= max(1.0, v.abs().max().item()) if v.numel() else 1.0
        torch.testing.assert_close(u.to(v.dtype), v, **tol)


def widened(args):
    """args with their floating tensors in float64: the composite forms' reference arguments."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def loss(f):
    """A scalar with non-zero second and third derivatives through any activation."""
    return lambda *args: f(*args).sin().sum()


def inputs(lead=(2,), m=5, k=4, n=3, bias=True):
    return sample_inputs(m, k, n, lead=lead, bias=bias)


# ------------------------------------------------------------------------- the functional layer

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_transforms_match_eager(backend, activation):
    x, w, b = inputs()
    f, e = fused(activation, backend), eager(activation)
    for transform in (
        lambda g: g(x, w, b),
        lambda g: grad(loss(g), argnums=ALL3)(x, w, b),
        lambda g: vjp(g, x, w, b)[1](torch.ones(2, 5, 3, dtype=x.dtype)),
        lambda g: jvp(g, (x, w, b), (x.cos(), w.cos(), b.cos())),
        lambda g: jacrev(g, argnums=ALL3)(x, w, b),
        lambda g: jacfwd(g, argnums=ALL3)(x, w, b),
        lambda g: hessian(loss(g), argnums=ALL3)(x, w, b),
        # forward-over-forward (the rule's own jvp differentiated by an enclosing jvp)
        lambda g: jacfwd(jacfwd(loss(g), argnums=ALL3), argnums=ALL3)(x, w, b),
        lambda g: jvp(lambda x: jvp(g, (x, w, b), (x.sin(), w, b))[1], (x,), (x.cos(),)),
        # Hessian-vector products: forward-over-reverse and reverse-over-reverse
        lambda g: jvp(grad(loss(g), argnums=ALL3), (x, w, b), (x.cos(), w.cos(), b.cos())),
        lambda g: grad(lambda *a: sum((u * v.cos()).sum() for u, v in zip(grad(loss(g), argnums=ALL3)(*a), a)),
                       argnums=ALL3)(x, w, b),
        # a batch of inputs (rows folded into one fused call), per-sample gradients
        lambda g: vmap(g, (1, None, None))(x, w, b),
        lambda g: vmap(grad(loss(g), argnums=(1, 2)), (0, None, None))(x, w, b),
        lambda g: vmap(jacfwd(g), (0, None, None))(x, w, b),
    ):
        close(transform(f), transform(e))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ("relu", "sigmoid", "gelu"))
def test_batched_weights(backend, activation):
    """Ensembles: vmap over stacked weights, alone or with the inputs, under grad and jvp."""
    x, _, _ = inputs(lead=())
    ws, bs = torch.randn(3, 3, 4, dtype=x.dtype), torch.randn(3, 3, dtype=x.dtype)
    xs = torch.randn(3, 5, 4, dtype=x.dtype)
    f, e = fused(activation, backend), eager(activation)
    for transform in (
        lambda g: vmap(g, (None, 0, 0))(x, ws, bs),
        lambda g: vmap(g, (0, 0, None))(xs, ws, bs[0]),
        lambda g: vmap(g, (0, None, 0))(xs, ws[0], bs),
        lambda g: vmap(grad(loss(g), argnums=ALL3), (0, 0, 0))(xs, ws, bs),
        lambda g: vmap(lambda w, b: jvp(lambda w: g(x, w, b), (w,), (w.cos(),)), (0, 0))(ws, bs),
        lambda g: grad(lambda ws: loss(vmap(g, (0, 0, 0)))(xs, ws, bs))(ws),
        lambda g: jvp(vmap(g, (None, 0, 0)), (x, ws, bs), (x.cos(), ws.cos(), bs.cos())),
    ):
        close(transform(f), transform(e))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_third_order(activation):
    """jacfwd(jacrev(hessian)) and autograd's third derivative (create_graph twice)."""
    x, w, b = inputs(lead=(), m=3, k=2, n=2)
    f, e = fused(activation, "auto"), eager(activation)
    close(jacfwd(jacrev(hessian(lambda b, g: loss(g)(x, w, b))))(b, f),
          jacfwd(jacrev(hessian(lambda b, g: loss(g)(x, w, b))))(b, e))

    def third(g):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        g1 = torch.autograd.grad(loss(g)(xr, wr, br), (xr, wr, br), create_graph=True)
        g2 = torch.autograd.grad(sum((u * u).sum() for u in g1), (xr, wr, br), create_graph=True)
        return torch.autograd.grad(sum(u.sum() for u in g2), (xr, wr, br))

    close(third(f), third(e))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [False, True])
def test_gradcheck_forward_ad_and_batched(backend, activation, recompute):
    x, w, b = sample_inputs(4, 3, 2, lead=(2,), requires_grad=True)
    f = fused(activation, backend, recompute)
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True, check_batched_grad=True)


def test_gradcheck_without_bias_and_one_dim_input():
    x, w, _ = sample_inputs(None, 3, 2, bias=False, requires_grad=True)
    f = fused("silu", "auto")
    assert x.dim() == 1
    assert torch.autograd.gradcheck(lambda x, w: f(x, w, None), (x, w), check_forward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: f(x, w, None), (x, w), check_fwd_over_rev=True)
    close(hessian(lambda x, w: loss(f)(x, w, None), argnums=(0, 1))(x.detach(), w.detach()),
          hessian(lambda x, w: loss(eager("silu"))(x, w, None), argnums=(0, 1))(x.detach(), w.detach()))


# --------------------------------------------------------------------------- modules and MLPs

def reference_mlp(mlp: fb.FusedMLP) -> nn.Sequential:
    """nn.Linear + torch's activation, the same parameters (a copy)."""
    layers = []
    for layer in mlp.layers:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
        linear.load_state_dict(layer.state_dict())
        layers.append(linear)
        if isinstance(layer, fb.FusedLinearAct):
            layers.append(_Act(layer.activation))
    return nn.Sequential(*layers)


class _Act(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.activation = activation

    def forward(self, z):
        return TORCH_ACT[self.activation](z)


def _mlp(activation, recompute, backend, seed=0):
    torch.manual_seed(seed)
    return fb.FusedMLP([4, 6, 5, 3], activation, recompute=recompute, last_activation=False, negative_slope=SLOPE,
                       backend=backend, dtype=torch.float64)


@pytest.mark.parametrize("recompute", ["none", "layer", "block"])
@pytest.mark.parametrize("activation", ("relu", "tanh", "leaky_relu", "gelu"))
def test_mlp_transforms(recompute, activation):
    mlp = _mlp(activation, recompute, "auto")
    ref = reference_mlp(mlp)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in mlp.named_parameters()}
    ref_params = dict(zip(dict(ref.named_parameters()), params.values()))

    def run(model, p):
        call = lambda p, x: functional_call(model, p, (x,))
        scalar = lambda p, x: call(p, x).sin().sum()
        tangent = {k: v.cos() for k, v in p.items()}
        return [
            call(p, x),
            grad(scalar)(p, x),
            jvp(lambda p: call(p, x), (p,), (tangent,)),
            jvp(grad(lambda p: scalar(p, x)), (p,), (tangent,)),
            vmap(grad(scalar), (None, 0))(p, x),                # per-sample gradients
            vmap(call, (None, 1))(p, x),
            hessian(lambda x: scalar(p, x))(x[0, :2]),
            jacfwd(jacfwd(lambda x: scalar(p, x)))(x[0, :2]),
            jacrev(lambda x: call(p, x))(x[0]),
        ]

    close(run(mlp, params), run(ref, ref_params))


@pytest.mark.parametrize("recompute", ["none", "block"])
@pytest.mark.parametrize("activation", ("sigmoid", "silu"))
def test_mlp_ensembles(recompute, activation):
    """torch.func.stack_module_state: a batch of models, as batched GEMMs."""
    models = [_mlp(activation, recompute, "auto", seed=s) for s in range(3)]
    refs = [reference_mlp(m) for m in models]
    x = torch.randn(5, 4, dtype=torch.float64)

    def run(models):
        params, _ = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        call = lambda p, x: functional_call(base, p, (x,))
        return [vmap(call, (0, None))(params, x),
                vmap(grad(lambda p, x: call(p, x).sin().sum()), (0, None))(params, x),
                vmap(jacfwd(lambda x, p: call(p, x)), (None, 0))(x[0], params)]

    close(run(models), run(refs))


@pytest.mark.parametrize("recompute", ["none", "layer", "block"])
def test_mlp_double_backward(recompute):
    """A gradient penalty through every recompute mode, against nn.Linear."""
    mlp = _mlp("gelu_tanh", recompute, "auto")
    ref = reference_mlp(mlp)
    x = torch.randn(2, 5, 4, dtype=torch.float64)

    def penalty(model):
        xr = x.clone().requires_grad_()
        wrt = [xr, *model.parameters()]
        first = torch.autograd.grad(model(xr).sin().sum(), wrt, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first), wrt)

    close(penalty(mlp), penalty(ref))


@pytest.mark.parametrize("layer", [fb.FusedLinearReLU(4, 3), fb.FusedLinearGELU(4, 3, approximate="tanh"),
                                   fb.FusedLinearLeakyReLU(4, 3, negative_slope=SLOPE)], ids=lambda m: m.activation)
def test_fused_modules(layer):
    layer = layer.double()
    linear = nn.Linear(4, 3, dtype=torch.float64)
    linear.load_state_dict(layer.state_dict())
    ref = nn.Sequential(linear, _Act(layer.activation))
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    for run in (lambda m, p: vmap(grad(lambda p, x: functional_call(m, p, (x,)).sin().sum()), (None, 0))(p, x),
                lambda m, p: jvp(lambda x: functional_call(m, p, (x,)), (x,), (x.cos(),))):
        close(run(layer, params), run(ref, dict(zip(("0.weight", "0.bias"), params.values()))))


# ------------------------------------------------------------- which paths run, and the kernels

@pytest.fixture
def spy(monkeypatch):
    """Records 'kernel' or 'composite' for each second-order core call, and which first-order
    backward ran."""
    log = []
    for name in ("linear_act_tangent_composite", "linear_act_bwd_bwd_composite"):
        original = getattr(func, name)

        def composite(*args, _original=original, _name=name):
            log.append(("composite", _name))
            return _original(*args)

        monkeypatch.setattr(func, name, composite)
    original_values = func.kernel_values

    def values(*tensors):
        found = original_values(*tensors)
        if found is not None:
            log.append(("kernel", None))
        return found

    monkeypatch.setattr(func, "kernel_values", values)

    def torch_backward(*args):
        log.append(("torch backend", None))
        return torch_backend.backward(*args)

    replace_backend(monkeypatch, "torch", backward=torch_backward)
    return log


def replace_backend(monkeypatch, name, **fields):
    """The registered backend ``name`` with some of its functions replaced, for this test."""
    monkeypatch.setitem(fb.backends._REGISTRY, name, dataclasses.replace(fb.backends.get(name), **fields))


needs_cpu = pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled extension not built")


@needs_cpu
def test_fused_paths_run(spy):
    x, w, b = inputs()
    f = fused("sigmoid", "cpu")
    # forward-mode AD and jvp-of-grad HVPs: the fused kernels
    jvp(f, (x, w, b), (x, w, b))
    jvp(grad(loss(f), argnums=ALL3), (x, w, b), (x, w, b))
    # double backward: the fused backward of the backward, never the torch backend's graph
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    first = torch.autograd.grad(loss(f)(xr, wr, br), (xr, wr, br), create_graph=True)
    torch.autograd.grad(first, (xr, wr, br), (x, w, b))
    assert [kind for kind, _ in spy] == ["kernel"] * 4, spy
    # vmap(jvp): batched tangents, composite; the torch backend's backward never stood in
    spy.clear()
    vmap(lambda t: jvp(f, (x, w, b), (t, w, b))[1])(x[None].expand(3, *x.shape))
    assert spy and all(kind == "composite" for kind, _ in spy), spy


@needs_cpu
def test_vmap_folds_rows(monkeypatch):
    """A batch of inputs runs the fused forward once on all the rows."""
    calls, original = [], fb.backends.get("cpu").forward
    replace_backend(monkeypatch, "cpu", forward=lambda x, *a: calls.append(x.shape) or original(x, *a))
    x, w, b = inputs(lead=(6,))
    vmap(fused("tanh", "cpu"), (0, None, None))(x, w, b)
    assert calls == [torch.Size([30, 4])]


@needs_cpu
@pytest.mark.parametrize("dtype,m,k,n", [(torch.float64, 37, 13, 11), (torch.float32, 257, 70, 67)],
                         ids=["float64", "float32-tiles"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernels_match_composite(activation, dtype, m, k, n):
    """The fused second-order kernels against their composite forms, from every kind of kept
    tensor (output or pre-activation, sign mask, none), with cotangents left out; in float32 at a
    size the tile GEMM takes (csrc/cpu/tile_gemm.h: m >= 256, tails in rows and columns)."""
    x, w, b = sample_inputs(m, k, n, dtype=dtype)
    g = torch.randn(m, n, dtype=x.dtype)
    xt, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    z = F.linear(x, w, b)
    y = TORCH_ACT[activation](z)
    kinds = [None, y if fb.activations.saves_output(activation, SLOPE) else z]
    if fb.activations.uses_sign_mask(activation, SLOPE):
        kinds.append(fb.sign_mask.pack(y, activation))
    with torch.no_grad():
        for kept in kinds:
            for tangents in ((xt, wt, bt), (xt, None, None), (None, wt, None), (None, None, bt)):
                args = (x, w, b, *tangents, kept, activation, SLOPE)
                assert func.kernel_values(x, w, b, *tangents, kept) is not None
                close(func.linear_act_tangent(*args), func.linear_act_tangent_composite(*widened(args)), dtype)
                for mask in ((True, True, True, True), (False, True, False, True), (True, False, True, False)):
                    args = (g, x, w, b, kept, *tangents, activation, SLOPE, mask)
                    got, want = func.linear_act_bwd_bwd(*args), func.linear_act_bwd_bwd_composite(*widened(args))
                    for a, e, shape in zip(got, want, (g.shape, x.shape, w.shape, b.shape)):
                        # None (zero by structure) in the composite, zeros from the kernel
                        close(a if a is not None else torch.zeros(shape, dtype=x.dtype),
                              e if e is not None else torch.zeros(shape, dtype=torch.float64), dtype)


def test_eager_and_transform_forms():
    """Plain calls take the C++ call path (tests/test_call_path.py) or, where it declines (here
    another backend), the combined-form Function (Function.apply binds a
    setup_context form's arguments with inspect.signature on every call); transforms and dual
    levels the other."""
    x, w, b = sample_inputs(5, 4, 3, requires_grad=True)
    assert fb.linear_act(x, w, b).grad_fn.name() == "FusedLinearActBackward"
    assert type(fb.linear_act(x, w, b, backend="torch").grad_fn).__name__ == "EagerLinearActFunctionBackward"
    mlp = _mlp("relu", "block", "auto")
    assert type(mlp(x.double()).grad_fn).__name__ == "EagerBlockFunctionBackward"
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = fb.linear_act(fwAD.make_dual(x.detach(), x.detach()), w, b)
        assert type(out.grad_fn).__name__ == "LinearActFunctionBackward"


# -------------------------------------------------------------------------- the registered ops

@needs_cpu
@pytest.mark.parametrize("activation", ("relu", "gelu"))
def test_registered_ops_vmap(activation):
    ops = torch.ops.fused_backprop
    x, w, b = inputs(lead=(3,))
    ws, bs = torch.randn(3, 3, 4, dtype=x.dtype), torch.randn(3, 3, dtype=x.dtype)
    g = torch.randn(3, 5, 3, dtype=x.dtype)
    close(vmap(lambda x: ops.linear_act_fwd(x, w, b, activation, SLOPE))(x), eager(activation)(x, w, b))
    close(vmap(lambda w, b: ops.linear_act_fwd(x[0], w, b, activation, SLOPE))(ws, bs),
          vmap(eager(activation), (None, 0, 0))(x[0], ws, bs))
    out, z = vmap(lambda x, w: ops.linear_act_fwd_preact(x, w, b, activation, SLOPE))(x, ws)
    close((out, z), (vmap(eager(activation), (0, 0, None))(x, ws, b), vmap(F.linear, (0, 0, None))(x, ws, b)))
    want = vmap(lambda g, x: torch_backend.backward(g, x, w, b, None, activation, (True, True, True), SLOPE))(g, x)
    for mask in ([True, False, False], [True, True, True]):
        got = vmap(lambda g, x, mask=mask: ops.linear_act_bwd(g, x, w, b, None, activation, mask, SLOPE))(g, x)
        for a, e, wanted in zip(got, want, mask):
            if wanted:
                close(a, e)
            else:
                assert a.numel() == 0


# ----------------------------------------------------------------------------------- triton

def test_triton_small():
    """One small case through the Triton kernels (the interpreter on the CPU)."""
    if "triton" not in fb.available_backends("cpu"):
        pytest.skip("triton backend not available here")
    x, w, b = inputs(lead=(), m=4, k=3, n=2)
    f, e = fused("sigmoid", "triton"), eager("sigmoid")
    for transform in (lambda g: jvp(grad(loss(g), argnums=ALL3), (x, w, b), (x, w, b)),
                      lambda g: vmap(grad(loss(g), argnums=(1, 2)), (0, None, None))(x, w, b)):
        close(transform(f), transform(e))
