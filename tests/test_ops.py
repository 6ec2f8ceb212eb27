"""The registered ops themselves: torch.library.opcheck for every op and every activation, dtypes,
and the op-level autograd."""

import itertools

import pytest
import torch
from helpers import (ACT_CASES, ACTIVATIONS, TOL, TORCH_FUNCTIONS, assert_close, dtype_id, keeps_mask, keeps_z,
                     sample_inputs)

import fused_backprop as fb  # noqa: F401  (registers the ops)
from fused_backprop import _ops, sign_mask
from fused_backprop.backends import torch_backend

ops = torch.ops.fused_backprop
pytestmark = pytest.mark.skipif(not fb.backends.get("cpu") or "cpu" not in fb.available_backends(),
                                reason="compiled extension not built")

CASES = [  # (m, k, n, noncontiguous)
    (0, 5, 3, False), (7, 5, 3, False), (7, 5, 3, True), (130, 33, 17, True),
]
MASKS = [[True, True, True], [False, True, False], [True, False, True]]


def _cycle(grid):
    """The structural grid (shapes, bias, masks, ...: the same code for every activation), each
    point with the next activation case in turn: every activation meets varied shapes without the
    cross product. test_opcheck_every_activation below crosses activations with what they keep."""
    acts = itertools.cycle(ACT_CASES)
    return [(*point[0], *point[1:], *next(acts).values) for point in grid]


def kept(x, w, b, activation, slope, how):
    """What backward takes as `out`: "kept" (the output or the pre-activation, as the layer keeps
    it), "mask" (the packed sign mask) or "none" (recompute)."""
    if how == "none":
        return None
    out, z = ops.linear_act_fwd_preact(x, w, b, activation, slope)
    if how == "mask":
        return sign_mask.pack(out, activation)
    return z if keeps_z(activation, slope) else out


def kept_kinds(activation, slope):
    return ["kept", "none"] + (["mask"] if keeps_mask(activation, slope) else [])


@pytest.mark.parametrize("m,k,n,noncontig,bias,requires_grad,activation,slope",
                         _cycle(itertools.product(CASES, [True, False], [False, True])))
def test_opcheck_forward(m, k, n, noncontig, bias, requires_grad, activation, slope):
    x, w, b = sample_inputs(m, k, n, bias=bias, requires_grad=requires_grad, noncontiguous=noncontig)
    torch.library.opcheck(ops.linear_act_fwd, (x, w, b, activation, slope))
    torch.library.opcheck(ops.linear_act_fwd_preact, (x, w, b, activation, slope))


@pytest.mark.parametrize("m,k,n,noncontig,recompute,mask,requires_grad,activation,slope",
                         _cycle(itertools.product(CASES, [False, True], MASKS, [False, True])))
def test_opcheck_backward(m, k, n, noncontig, recompute, mask, requires_grad, activation, slope):
    x, w, b = sample_inputs(m, k, n, noncontiguous=noncontig, requires_grad=requires_grad)
    out = kept(x.detach(), w.detach(), b.detach(), activation, slope, "none" if recompute else "kept")
    if out is not None:
        out.requires_grad_(requires_grad)
    g = torch.randn(m, n, dtype=x.dtype, requires_grad=requires_grad)
    torch.library.opcheck(ops.linear_act_bwd, (g, x, w, b, out, activation, mask, slope))


@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_every_activation(activation, slope, requires_grad):
    """Every op for every activation: forward, forward with the pre-activation, backward from each
    thing it may be given (the kept output or pre-activation, the sign mask, nothing), and the
    forward-mode and double-backward ops."""
    x, w, b = sample_inputs(7, 5, 3, noncontiguous=True, requires_grad=requires_grad)
    for op in (ops.linear_act_fwd, ops.linear_act_fwd_preact):
        torch.library.opcheck(op, (x, w, b, activation, slope))
    g = torch.randn(7, 3, dtype=x.dtype, requires_grad=requires_grad)
    tangents = [torch.randn_like(t).requires_grad_(requires_grad) for t in (x, w, b)]
    for how in kept_kinds(activation, slope):
        out = kept(x.detach(), w.detach(), b.detach(), activation, slope, how)
        torch.library.opcheck(ops.linear_act_bwd, (g, x, w, b, out, activation, [True, True, True], slope))
        if requires_grad and how != "kept":
            continue  # their autograd (the vjp of the composite form) with one kind; the kernels with all
        torch.library.opcheck(ops.linear_act_jvp, (x, w, b, *tangents, out, activation, slope))
        torch.library.opcheck(ops.linear_act_bwd_bwd, (g, x, w, b, out, *tangents, activation,
                                                       [True, True, True, True], slope))


@pytest.mark.parametrize("activation", ["sigmoid", "gelu"])
def test_second_order_ops_are_differentiable(activation):
    """linear_act_jvp and linear_act_bwd_bwd called directly on tensors that require grad: their
    gradients must be right (as linear_act_bwd's are), not silently None."""
    x, w, b = sample_inputs(6, 4, 3, requires_grad=True)
    tangents = [torch.randn_like(t).requires_grad_(True) for t in (x, w, b)]
    g = torch.randn(6, 3, dtype=x.dtype, requires_grad=True)

    def jvp(x, w, b, *tangents):
        return ops.linear_act_jvp(x, w, b, *tangents, None, activation, 0.01)

    def bwd_bwd(g, x, w, b, *tangents):
        return ops.linear_act_bwd_bwd(g, x, w, b, None, *tangents, activation, [True, True, True, True], 0.01)

    assert torch.autograd.gradcheck(jvp, (x, w, b, *tangents))
    assert torch.autograd.gradcheck(bwd_bwd, (g, x, w, b, *tangents))


@pytest.mark.parametrize("activation,slope,how", [pytest.param(*case.values, how, id=f"{case.id}-{how}")
                                                 for case in ACT_CASES for how in kept_kinds(*case.values)])
def test_jvp_and_bwd_bwd_ops_match_autograd(activation, slope, how):
    """linear_act_jvp against torch.func.jvp of torch's own layer, linear_act_bwd_bwd against
    autograd's double backward of it, from each thing backward may be given."""
    x, w, b = sample_inputs(9, 6, 5)
    out = kept(x, w, b, activation, slope, how)
    tangents = [torch.randn_like(t) for t in (x, w, b)]
    act = TORCH_FUNCTIONS[activation]

    def layer(x, w, b):
        return act(torch.nn.functional.linear(x, w, b), slope)

    _, want = torch.func.jvp(layer, (x, w, b), tuple(tangents))
    assert_close(ops.linear_act_jvp(x, w, b, *tangents, out, activation, slope), want)
    g = torch.randn(9, 5, dtype=x.dtype)
    leaves = [t.clone().requires_grad_(True) for t in (g, x, w, b)]
    first = torch.autograd.grad(layer(*leaves[1:]), leaves[1:], leaves[0], create_graph=True)
    want = torch.autograd.grad(first, leaves, tangents, allow_unused=True)
    got = ops.linear_act_bwd_bwd(g, x, w, b, out, *tangents, activation, [True, True, True, True], slope)
    for a, e in zip(got, want):
        assert_close(a, torch.zeros_like(a) if e is None else e)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_backward_op_is_differentiable(recompute, activation, slope):
    """Differentiating the backward op itself (no silent zero gradients)."""
    x, w, b = sample_inputs(6, 4, 3, requires_grad=True)
    # relu's (and zero-slope leaky relu's) saved output sits on the kink (exact zeros), where no
    # numerical derivative exists.
    on_kink = activation == "relu" or (activation == "leaky_relu" and slope == 0)
    out = kept(x.detach(), w.detach(), b.detach(), activation, slope, "kept").requires_grad_(not on_kink)
    g = torch.randn(6, 3, dtype=x.dtype, requires_grad=True)

    def f(g, x, w, b, out):
        return ops.linear_act_bwd(g, x, w, b, None if recompute else out, activation, [True, True, True], slope)

    assert torch.autograd.gradcheck(f, (g, x, w, b, out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("activation,slope,m", [(*a.values, 300) for a in ACT_CASES]  # one row chunk
                         + [(a, 0.01, 2500) for a in ACTIVATIONS])  # per-thread L2 panels
@pytest.mark.parametrize("recompute", [False, True])
def test_ops_match_torch_backend(dtype, activation, slope, recompute, m):
    x, w, b = sample_inputs(m, 70, 45, dtype=dtype)
    out, z = ops.linear_act_fwd_preact(x, w, b, activation, slope)
    assert torch.equal(out, ops.linear_act_fwd(x, w, b, activation, slope))
    # Reference in float64 from the same (rounded) inputs.
    x64, w64, b64 = (t.double() for t in (x, w, b))
    assert_close(out, torch_backend.forward(x64, w64, b64, activation, slope), dtype)
    assert_close(z, torch.nn.functional.linear(x64, w64, b64), dtype)
    g = torch.randn(m, 45, dtype=torch.float64).to(dtype)
    given = z if keeps_z(activation, slope) else out
    got = ops.linear_act_bwd(g, x, w, b, None if recompute else given, activation, [True, True, True], slope)
    # act' from the kernel's own (rounded) output or pre-activation: in 16-bit, a pre-activation
    # within rounding of 0 may take either side of relu's kink, and the recomputation must agree
    # with the forward.
    want = torch_backend.backward(g.double(), x64, w64, b64, given.double(), activation, (True, True, True), slope)
    for a, e in zip(got, want):
        # Gradients sum over m terms: allow for the accumulation in the dtype's precision.
        torch.testing.assert_close(a, e.to(dtype), rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 30)


def test_masked_outputs_are_empty():
    x, w, b = sample_inputs(4, 3, 2)
    dx, dw, db = ops.linear_act_bwd(torch.ones(4, 2, dtype=x.dtype), x, w, b, None, "relu", [False, True, False])
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == w.shape


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", MASKS)
def test_eager_bindings_match_ops(bias, mask):
    """The extension's own bindings (the eager path of the cpu/cuda backends) run the same kernels
    below autograd: same values, None for each gradient left out, no graph, fake tensors work."""
    from fused_backprop import _C

    x, w, b = sample_inputs(37, 11, 6, bias=bias, requires_grad=True)
    out = _C.linear_act_fwd(x, w, b, "sigmoid", 0.01)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, ops.linear_act_fwd(x, w, b, "sigmoid").detach())
    out_p, z = _C.linear_act_fwd_preact(x, w, b, "silu", 0.01)
    assert out_p.grad_fn is None and z.grad_fn is None
    want_p, want_z = ops.linear_act_fwd_preact(x, w, b, "silu")
    assert torch.equal(out_p, want_p.detach()) and torch.equal(z, want_z.detach())
    g = torch.randn_like(out)
    for activation, given in (("sigmoid", out), ("silu", z), ("leaky_relu", None)):
        got = _C.linear_act_bwd(g, x, w, b, given, activation, mask, -0.3)
        want = ops.linear_act_bwd(g, x, w, b, given, activation, mask, -0.3)
        for a, e, wanted in zip(got, want, [mask[0], mask[1], mask[2] and bias]):
            if wanted:
                assert torch.equal(a, e.detach())
            else:
                assert a is None
    x, w = x.detach(), w.detach()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        assert _C.linear_act_fwd(fx, fw, None, "relu", 0.01).shape == (37, 6)
        assert [t.shape for t in _C.linear_act_fwd_preact(fx, fw, None, "gelu", 0.01)] == [(37, 6), (37, 6)]


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_op_level_autograd(activation, slope):
    """register_autograd gives the registered forward ops a backward (and a double backward),
    linear_act_fwd_preact through both of its outputs."""
    x, w, b = sample_inputs(9, 4, 3, requires_grad=True)

    def fwd(*a):
        return ops.linear_act_fwd(*a, activation, slope)

    def preact(*a):
        return ops.linear_act_fwd_preact(*a, activation, slope)

    for f in (fwd, preact):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_is_deterministic(activation):
    x, w, b = sample_inputs(5000, 40, 30, dtype=torch.float32)
    g = torch.randn(5000, 30)
    for how in ("none", "kept"):
        out = kept(x, w, b, activation, 0.01, how)
        runs = [ops.linear_act_bwd(g, x, w, b, out, activation, [True, True, True]) for _ in range(3)]
        for other in runs[1:]:
            for a, e in zip(runs[0], other):
                assert torch.equal(a, e)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_panels_share_packed_weight(activation):
    """float32 forward over per-thread row panels with both sides of W at least 256 packs W once for
    all panels: 2600 rows in 12 panels of 217, the last one (213 rows) through the plain GEMM. The
    packed buffer is kept for the next call, so calls with a larger and then a smaller W reuse it.
    Each checked against float64 from the same inputs, the pre-activation of forward_preact too.
    The reuse is the activation's business for relu and sigmoid; the others run the first shape."""
    for k, n in [(256, 260), (300, 280), (256, 260)][:3 if activation in ("relu", "sigmoid") else 1]:
        x, w, b = sample_inputs(2600, k, n, dtype=torch.float32)
        out = ops.linear_act_fwd(x, w, b, activation)
        want = torch_backend.forward(x.double(), w.double(), b.double(), activation, 0.01)
        assert_close(out, want, torch.float32)
        if keeps_z(activation):
            out_p, z = ops.linear_act_fwd_preact(x, w, b, activation)
            assert torch.equal(out_p, out)
            assert_close(z, torch.nn.functional.linear(x.double(), w.double(), b.double()), torch.float32)


# Each thing backward may be given, with an activation that keeps it, in both dtypes for relu and
# sigmoid and in float32 (W packed once for all chunks) for the others: the chunked path runs the
# same elementwise code for every activation (test_ops_match_torch_backend covers them all).
LARGE_CASES = [(a, 0.01, how, dtype) for dtype in (torch.float64, torch.float32)
               for a, how in [("relu", "kept"), ("relu", "none"), ("relu", "mask"), ("sigmoid", "kept"),
                              ("sigmoid", "none")]] + [
    (a, slope, how, torch.float32) for a, slope, how in [("tanh", 0.01, "kept"), ("leaky_relu", 0.2, "mask"),
                                                         ("leaky_relu", -0.5, "kept"), ("gelu", 0.01, "kept"),
                                                         ("silu", 0.01, "none")]]


@pytest.mark.parametrize("activation,slope,saved,dtype", LARGE_CASES)
def test_large_weight_chunked(activation, slope, saved, dtype):
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
    if keeps_z(activation, slope):
        out, ref_out = ops.linear_act_fwd_preact(x, w, b, activation, slope)
    else:
        out = ref_out = ops.linear_act_fwd(x, w, b, activation, slope)
    x64, w64, b64 = (t.double() for t in (x, w, b))
    assert_close(out, torch_backend.forward(x64, w64, b64, activation, slope), dtype)
    given = {"kept": ref_out, "none": None}[saved] if saved != "mask" else sign_mask.pack(out, activation)
    g = torch.randn(2100, n, dtype=dtype)
    got = ops.linear_act_bwd(g, x, w, b, given, activation, [True, True, True], slope)
    want = torch_backend.backward(g.double(), x64, w64, b64, ref_out.double(), activation, (True, True, True), slope)
    for a, e in zip(got, want):
        # Gradients sum over up to 2100 terms: allow for the accumulation in the dtype's precision.
        torch.testing.assert_close(a, e.to(dtype), rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 30)


def _check_every_saved_form(m, k, n, dtype, activation, slope):
    """Forward, the pre-activation and the backward from each thing it may keep, every output_mask
    with one gradient, all against float64 from the same inputs."""
    x, w, b = sample_inputs(m, k, n, dtype=dtype)
    x64, w64, b64 = (t.double() for t in (x, w, b))
    out, z = ops.linear_act_fwd_preact(x, w, b, activation, slope)
    assert torch.equal(out, ops.linear_act_fwd(x, w, b, activation, slope))
    assert_close(out, torch_backend.forward(x64, w64, b64, activation, slope), dtype)
    assert_close(z, torch.nn.functional.linear(x64, w64, b64), dtype)
    g = torch.randn(m, n, dtype=dtype)
    ref_out = z if keeps_z(activation, slope) else out
    want = torch_backend.backward(g.double(), x64, w64, b64, ref_out.double(), activation, (True, True, True), slope)
    for how in kept_kinds(activation, slope):
        given = kept(x, w, b, activation, slope, how)
        got = ops.linear_act_bwd(g, x, w, b, given, activation, [True, True, True], slope)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e.to(dtype), rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 30)
        for i in range(3):
            mask = [j == i for j in range(3)]
            alone = ops.linear_act_bwd(g, x, w, b, given, activation, mask, slope)
            assert torch.equal(alone[i], got[i])
            assert all(alone[j].numel() == 0 for j in range(3) if j != i)


# K: a partial vector only, whole float (16) and double (8) vectors with tails; N: whole groups of 4
# rows of W and a tail; the last shape's W is larger than L2.
SINGLE_ROW_SHAPES = [(1, 1), (3, 5), (37, 22), (64, 8), (1030, 1027)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("sigmoid", 0.01), ("gelu", 0.01)])
@pytest.mark.parametrize("k,n", SINGLE_ROW_SHAPES)
def test_single_row(dtype, activation, slope, k, n):
    """A single row (M = 1) takes its own GEMV and rank-1 loops (csrc/cpu/small_m.h) where the tile
    GEMM is on, the BLAS elsewhere."""
    _check_every_saved_form(1, k, n, dtype, activation, slope)


# A few rows of a wide layer (more than 2^18 multiply-adds): M against the dot tiles' 4 (AVX2: 3)
# rows and the tile GEMM's 6, N against groups of 4 rows of W, 16-column strips and 64-column
# blocks, K against whole vectors and K < 128 (the forward takes the BLAS or the tile GEMM there);
# M >= 256 takes these loops for the backward only (at AVX2 the backward only below 16 rows or for
# a W within half of L2); the last W is larger than L2.
FEW_ROWS_SHAPES = [(2, 1030, 129), (7, 131, 300), (13, 200, 1027), (255, 129, 67), (5, 64, 1000), (300, 64, 70),
                   (3, 1024, 1030), (8, 520, 1030)]  # the last: the forward's loops on Intel too (W > L2 / 2)


@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("sigmoid", 0.01), ("gelu", 0.01)])
@pytest.mark.parametrize("m,k,n", FEW_ROWS_SHAPES, ids=lambda v: str(v))
def test_few_rows(activation, slope, m, k, n):
    """2 <= M < 1024 rows of a float layer too large for one thread take small_m.h's GEMMs that read
    W in place where the tile GEMM is on (the BLAS elsewhere)."""
    _check_every_saved_form(m, k, n, torch.float32, activation, slope)


# The tile GEMM's two ways of sharing out the work (csrc/cpu/kernels_impl.h, tiles_parallel): column
# blocks per thread where x fits in half of L2 and the blocks (64 columns at AVX512, 16 at AVX2)
# share out evenly, else W packed first and rows per thread. N = 67 is 2 blocks at AVX512 and 5 at
# AVX2, N = 192 is 3 and 12; at K = 1100, 300 rows of x (1.3 MB) are beyond half of a 2 MiB L2.
TILE_SHAPES = [(257, 70, 67), (300, 40, 192), (300, 1100, 70)]


@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("sigmoid", 0.01)])
@pytest.mark.parametrize("m,k,n", TILE_SHAPES, ids=lambda v: str(v))
def test_tile_gemm_work_sharing(activation, slope, m, k, n):
    """M >= 256 rows of a float layer take the tile GEMM where it is on (the BLAS elsewhere), with
    either way of sharing it out among the threads."""
    _check_every_saved_form(m, k, n, torch.float32, activation, slope)
