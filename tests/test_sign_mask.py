"""ReLU under recompute keeps a packed 1-bit sign mask instead of its output."""

import pytest
import torch

import fused_backprop as fb
from fused_backprop import sign_mask


@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (3, 5), (7, 8), (2, 3, 9)])
def test_pack_unpack_roundtrip(shape):
    y = torch.relu(torch.randn(shape))
    if y.numel():
        y.view(-1)[0] = float("nan")
    packed = sign_mask.pack(y)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-y.numel() // 8)
    assert torch.equal(packed, sign_mask.pack_composite(y))  # the C++ pass and the torch ops agree
    torch.library.opcheck(torch.ops.fused_backprop.sign_mask_pack, (y,))
    want = (y <= 0).logical_not().double()
    assert torch.equal(sign_mask.unpack(packed, y.shape, torch.float64), want)


def saved_bytes(fn):
    storages = {}

    def pack_hook(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fn()
    return sum(storages.values())


def test_relu_recompute_saves_mask_not_output():
    x = torch.randn(4096, 64, requires_grad=True)
    w = torch.randn(256, 64, requires_grad=True)
    param_bytes = w.numel() * 4
    out_bytes = 4096 * 256 * 4
    kept = saved_bytes(lambda: fb.linear_relu(x, w, recompute=False).sum()) - param_bytes - x.numel() * 4
    masked = saved_bytes(lambda: fb.linear_relu(x, w, recompute=True).sum()) - param_bytes - x.numel() * 4
    assert kept == out_bytes
    assert masked == out_bytes // 32


@pytest.mark.parametrize("m,k,n", [(1, 3, 5), (37, 13, 11), (300, 20, 64)])
def test_cpu_kernel_reads_the_packed_mask(m, k, n):
    """The CPU backward takes relu's packed mask as `out` and gives the gradients of the output."""
    x, w, b = torch.randn(m, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    out = torch.ops.fused_backprop.linear_act_fwd(x, w, b, "relu")
    g = torch.randn(m, n, dtype=torch.float64)
    want = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, out, "relu", [True, True, True])
    got = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, sign_mask.pack(out), "relu", [True, True, True])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fused_backprop.linear_act_bwd,
                          (g, x, w, b, sign_mask.pack(out), "relu", [True, True, True]))


def test_packed_mask_errors():
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    g, packed = torch.randn(4, 5), torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"packed sign mask must have shape \(3,\)"):
        torch.ops.fused_backprop.linear_act_bwd(g, x, w, None, packed[:2], "relu", [True, True, False])
    with pytest.raises(ValueError, match="only for activation 'relu'"):
        torch.ops.fused_backprop.linear_act_bwd(g, x, w, None, packed, "sigmoid", [True, True, False])
