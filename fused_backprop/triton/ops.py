"""Launch wrappers for the Triton kernels and their registration as PyTorch ops.

``torch.ops.fused_backprop.triton_linear_act_fwd`` / ``triton_linear_act_fwd_preact`` /
``triton_linear_act_bwd`` have the schemas of the compiled ``linear_act_fwd`` /
``linear_act_fwd_preact`` / ``linear_act_bwd`` ops:

    triton_linear_act_fwd(Tensor x, Tensor weight, Tensor? bias, str activation,
                          float negative_slope=0.01) -> Tensor
    triton_linear_act_fwd_preact(Tensor x, Tensor weight, Tensor? bias, str activation,
                                 float negative_slope=0.01) -> (Tensor, Tensor)
    triton_linear_act_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? out,
                          str activation, bool[] output_mask, float negative_slope=0.01)
                          -> (Tensor, Tensor, Tensor)

They are ``torch.library.custom_op``s (opaque to tracing) with fake kernels, so ``opcheck`` and
``torch.compile(fullgraph=True)`` work; ``triton_op`` is not used because under the interpreter
(``TRITON_INTERPRET=1``) opcheck and torch.compile fail with it. Outputs masked out in backward
are empty 0-element tensors, as in the compiled op. ``negative_slope`` is leaky relu's parameter
(the other activations ignore it). ``triton_linear_act_fwd_preact`` also returns the pre-activation
z = x W^T + b. Backward's ``out`` is what ``activations.saves_output`` says: the layer output y
(relu, sigmoid, tanh, leaky relu with negative_slope >= 0) or z (gelu, gelu_tanh, silu, leaky relu
with negative_slope < 0); None means "recompute z from x, weight, bias"; for relu and leaky relu
(negative_slope >= 0) it may also be the packed 1-bit sign mask (uint8, ceil(M * N / 8) bytes,
``fused_backprop.sign_mask``), read by the kernels directly.

fp32 inputs use ``input_precision="ieee"`` (exact fp32 products, as torch with TF32 disabled);
``set_allow_tf32(True)`` (or ``FUSED_BACKPROP_TRITON_TF32=1``) opts in to TF32 tensor cores.
fp16/bf16 inputs accumulate in fp32, fp64 in fp64.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import sign_mask
from ..activations import ACTIVATIONS as _ACTIVATIONS
from ..activations import DEFAULT_NEGATIVE_SLOPE, saves_output, uses_sign_mask
from . import kernels as _k

__all__ = ["linear_act_forward", "linear_act_backward", "set_allow_tf32", "allow_tf32",
           "triton_linear_act_fwd", "triton_linear_act_fwd_preact", "triton_linear_act_bwd"]

_ALLOW_TF32 = os.environ.get("FUSED_BACKPROP_TRITON_TF32", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def set_allow_tf32(flag: bool) -> None:
    """Let fp32 GEMMs use TF32 tensor cores (10-bit mantissa products). Off by default."""
    global _ALLOW_TF32
    _ALLOW_TF32 = bool(flag)


def allow_tf32() -> bool:
    return _ALLOW_TF32


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if _ALLOW_TF32 else "ieee"
    if dtype == torch.float64:
        return "ieee"
    return "tf32"  # 16-bit operands: ignored (native fp16/bf16 MMA); Triton's default value


def _activation_code(activation: str) -> int:
    try:
        return _k.ACTIVATION_CODES[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {tuple(_k.ACTIVATION_CODES)}, got {activation!r}") from None


def _check(x, weight, bias, activation, negative_slope, op: str, **others) -> None:
    """Argument checks of the public ops; each message names the tensor."""
    _activation_code(activation)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (M, in_features), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must have shape (out_features, in_features={x.shape[1]}), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, t, shape in (("weight", weight, None), ("bias", bias, None),
                           *((n, t, (x.shape[0], weight.shape[0])) for n, t in others.items())):
        if t is None:
            continue
        if name == "out" and _is_sign_mask(t):
            nbytes = (x.shape[0] * weight.shape[0] + 7) // 8
            if not uses_sign_mask(activation, negative_slope):
                raise ValueError(f"{op}: out may be a packed sign mask (uint8) only for activation 'relu' or "
                                 f"'leaky_relu' with negative_slope >= 0, got {activation!r} "
                                 f"(negative_slope={negative_slope})")
            if t.device != x.device:
                raise RuntimeError(f"{op}: out must be on the device of x ({x.device}), got {t.device}")
            if t.dim() != 1 or t.shape[0] != nbytes or t.stride(0) != 1:
                raise ValueError(f"{op}: out as a packed sign mask must be contiguous of shape ({nbytes},) = "
                                 f"ceil(M * N / 8) bytes, got shape {tuple(t.shape)}")
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"{op}: {name} must be on the device of x ({x.device}), got {t.device}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if x.device.type == "cpu" and not _k.INTERPRET:
        raise RuntimeError(f"{op}: CPU tensors run only under the Triton interpreter "
                           "(set TRITON_INTERPRET=1 before triton is imported)")
    if _k.INTERPRET and x.dtype == torch.bfloat16:
        raise TypeError(f"{op}: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); "
                        "run it on a CUDA GPU")


def _v_strides(v):
    """(stride_m, stride_n) of the tensor act' is read from; a packed sign mask is indexed by the
    element number instead (the strides are unused)."""
    return (0, 0) if v.dim() == 1 else (v.stride(0), v.stride(1))


def _is_sign_mask(out) -> bool:
    """The packed 1-bit sign mask (``fused_backprop.sign_mask``) passed as ``out``."""
    return out is not None and out.dtype == torch.uint8


def _mode(out, activation: str, negative_slope: float) -> int:
    """Where backward takes act' from (the kernels' constexpr MODE), by what ``out`` holds."""
    if out is None:
        return _k.MODE_RECOMPUTE.value
    if _is_sign_mask(out):
        return _k.MODE_SIGN_MASK.value
    return (_k.MODE_OUTPUT if saves_output(activation, negative_slope) else _k.MODE_PREACT).value


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _torch_dz(grad_out, x, weight, bias, out, activation, negative_slope):
    """dZ = dY * act'(.) from torch ops, with the kernels' semantics for every kind of ``out``
    (the degenerate shapes, which run no kernel)."""
    spec, a = _ACTIVATIONS[activation], negative_slope
    if out is None:
        return grad_out * spec.grad_from_preact(torch.nn.functional.linear(x, weight, bias), a)
    if _is_sign_mask(out):
        bit = sign_mask.unpack(out, grad_out.shape, torch.bool)
        return torch.where(bit, grad_out, grad_out * a if activation == "leaky_relu" else 0)
    if saves_output(activation, negative_slope):
        return grad_out * spec.grad_from_output(out, a)
    return grad_out * spec.grad_from_preact(out, a)


# ------------------------------------------------------------------------------------------------
# Forward.
# ------------------------------------------------------------------------------------------------

def linear_act_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE, *,
                       return_preact: bool = False):
    """``act(x @ weight.T + bias)`` for a 2-D x, as one Triton kernel (no argument checks);
    with ``return_preact``, ``(out, z)``: the same kernel also stores z = x @ weight.T + bias."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    preact = torch.empty_like(out) if return_preact else None
    if M == 0 or N == 0 or K == 0:
        if M and N:  # empty reduction: z = bias (or 0); nothing for a GEMM kernel to do
            z = torch.zeros_like(out) if bias is None else bias.expand(M, N)
            out.copy_(_ACTIVATIONS[activation].forward(z, negative_slope))
            if preact is not None:
                preact.copy_(z)
        return (out, preact) if return_preact else out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    p = preact if preact is not None else out
    with _device_guard(x):
        _k._linear_act_forward_kernel[grid](
            x, weight, bias if bias is not None else x, out, p,
            M, N, K,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1), p.stride(0), p.stride(1),
            float(negative_slope),
            ACT=_activation_code(activation), HAS_BIAS=bias is not None, STORE_PREACT=preact is not None,
            ACC_DTYPE=_acc_dtype(x.dtype), INPUT_PRECISION=_input_precision(x.dtype),
        )
    return (out, preact) if return_preact else out


# ------------------------------------------------------------------------------------------------
# Backward.
# ------------------------------------------------------------------------------------------------

def _num_splits(role: str, M: int, N: int, K: int, itemsize: int, device: torch.device, need_dw: bool = True) -> int:
    """How many pieces the reduction of the dW/db ("dw": over M) or dX ("dx": over N) kernel is
    split into on this device: ``kernels.reduction_splits`` for its 64x64 output tiles."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _k.reduction_splits(*_split_terms(role, M, N, K, itemsize, need_dw), sms)


def _split_terms(role, M, N, K, itemsize, need_dw=True):
    """(output tiles, reduction length, fp32 workspace bytes per split, bytes read) of the dW/db or dX GEMM."""
    read = M * (2 * N + K) * itemsize if role == "dw" else (2 * M * N + N * K) * itemsize
    if role == "dw":
        return triton.cdiv(N, 64) * (triton.cdiv(K, 64) if need_dw else 1), M, 4 * ((N * K if need_dw else 0) + N), read
    return triton.cdiv(M, 64) * triton.cdiv(K, 64), N, 4 * M * K, read


def _split_length(length: int, s: int, exact: bool) -> int:
    """Rows (columns) per split of a reduction of ``length`` in about s pieces: whole multiples of
    the largest reduction step; with ``exact`` (the tests' override, which honours small counts) of
    8, so that dX's splits start on whole bytes of a packed sign mask's rows."""
    step = 8 if exact else _k.MAX_BLOCK_RED
    return triton.cdiv(triton.cdiv(length, max(int(s), 1)), step) * step


# Layers at most this wide (N and K, padded to powers of two) take the single-pass backward kernel;
# 0 forces the two-GEMM path everywhere (tests use it to cover both).
NARROW_MAX = _k.NARROW_MAX


def _use_narrow(N: int, K: int, x: torch.Tensor, act: int, mode: int) -> bool:
    if max(16, _k._next_pow2(N)) > NARROW_MAX or max(16, _k._next_pow2(K)) > NARROW_MAX:
        return False
    if x.device.type != "cuda":
        return True  # the interpreter
    return narrow_on_gpu(torch.cuda.get_device_capability(x.device), x.dtype, act, mode, N % 8 == 0)


def narrow_on_gpu(capability: tuple, dtype: torch.dtype, act: int, mode: int, byte_rows: bool) -> bool:
    """Whether a narrow layer's backward takes the single-pass kernel on a GPU of this compute
    capability: 16-bit inputs on kernels.NARROW_CAPABILITY only, for a variant with a spill-free
    config."""
    return (tuple(capability) == _k.NARROW_CAPABILITY and dtype in (torch.float16, torch.bfloat16)
            and _k.narrow_spill_free(act, mode, byte_rows))


def _splits_narrow(M: int, N: int, K: int, itemsize: int, device: torch.device) -> int:
    """Row blocks of the single-pass narrow backward: one program per SM (each loops over its
    rows), at least 256 rows each, the fp32 dW/db partials under 1/8 of the bytes read."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    by_bytes = max(1, (M * (2 * N + K) * itemsize // 8) // (4 * (N * K + N)))
    return max(1, min(sms, M // 256, by_bytes))


def _workspace_dtype(dtype):
    """The dtype of split partials: fp32 (fp64 for fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_outputs(s, N, K, need_dw, need_db, dtype, dev):
    """(dw, db, dw_t, db_t): the results, and where the s row splits write their partial dW / db
    (the results themselves when s == 1; else fp32 — fp64 for fp64 — workspaces of s slices)."""
    dw = torch.empty((N, K), device=dev, dtype=dtype) if need_dw else None
    db = torch.empty((N,), device=dev, dtype=dtype) if need_db else None
    if s == 1:
        return dw, db, dw, db
    dw_t = torch.empty((s, N, K), device=dev, dtype=_workspace_dtype(dtype)) if need_dw else None
    db_t = torch.empty((s, N), device=dev, dtype=_workspace_dtype(dtype)) if need_db else None
    return dw, db, dw_t, db_t


def _reduce_splits(partials, results) -> None:
    """Second, fixed-order stage of the deterministic split reduction: result = sum over splits."""
    for ws, res in zip(partials, results):
        if ws is None:
            continue
        L = res.numel()
        _k._sum_splits_kernel[(triton.cdiv(L, 1024),)](ws, res, L, ws.shape[0], ws.stride(0), BLOCK=1024)


def _narrow_backward(grad_out, x, weight, bias, out, act, mode, slope, need_dx, need_dw, need_db, splits):
    M, K = x.shape
    N = weight.shape[0]
    dev, dtype = x.device, x.dtype
    s = splits if splits is not None else _splits_narrow(M, N, K, x.element_size(), dev)
    rows = triton.cdiv(M, max(int(s), 1))
    if splits is None:  # whole row blocks of the largest BLOCK_M per split
        rows = triton.cdiv(rows, _k.NARROW_MAX_BLOCK_M) * _k.NARROW_MAX_BLOCK_M
    s = triton.cdiv(M, rows)
    dx = torch.empty((M, K), device=dev, dtype=dtype) if need_dx else None
    dw, db, dw_t, db_t = _split_outputs(s, N, K, need_dw, need_db, dtype, dev)
    v = grad_out if out is None else out
    dx_arg = dx if dx is not None else x
    _k._linear_act_backward_narrow_kernel[(s,)](
        grad_out, v, x, weight, bias if bias is not None else x, dx_arg,
        dw_t if dw_t is not None else x, db_t if db_t is not None else x,
        M, N, K, rows,
        grad_out.stride(0), grad_out.stride(1), *_v_strides(v), x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        dx_arg.stride(0), dx_arg.stride(1),
        dw_t.stride(0) if (need_dw and s > 1) else 0,
        dw_t.stride(-2) if need_dw else 0, dw_t.stride(-1) if need_dw else 0,
        db_t.stride(0) if (need_db and s > 1) else 0, db_t.stride(-1) if need_db else 0, slope,
        ACT=act, MODE=mode, HAS_BIAS=bias is not None,
        COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
        ACC_DTYPE=_acc_dtype(dtype), INPUT_PRECISION=_input_precision(dtype),
        BLOCK_N=max(16, _k._next_pow2(N)), BLOCK_K=max(16, _k._next_pow2(K)),
    )
    if s > 1:
        _reduce_splits((dw_t, db_t), (dw, db))
    return dx, dw, db


def linear_act_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], out: Optional[torch.Tensor], activation: str,
                        output_mask, negative_slope: float = DEFAULT_NEGATIVE_SLOPE, *,
                        splits: Optional[int] = None):
    """(dx, dw, db) of ``act(x @ weight.T + bias)``, None where output_mask is False or bias is None.
    ``out`` is y, z or the packed sign mask as the module docstring says; None recomputes the
    pre-activation. ``splits`` overrides the dX and dW/db split heuristics (tests use it to exercise the
    two-stage reduction on the CPU)."""
    need_dx, need_dw = bool(output_mask[0]), bool(output_mask[1])
    need_db = bool(output_mask[2]) and bias is not None
    M, K = x.shape
    N = weight.shape[0]
    dev, dtype = x.device, x.dtype
    act = _activation_code(activation)
    mode, slope = _mode(out, activation, negative_slope), float(negative_slope)
    acc_dtype, precision = _acc_dtype(dtype), _input_precision(dtype)

    if M == 0 or N == 0 or K == 0:
        # Degenerate shapes: no GEMM to run. Gradients are zeros or empty except db when K == 0.
        dx = torch.zeros((M, K), device=dev, dtype=dtype) if need_dx else None
        dw = torch.zeros((N, K), device=dev, dtype=dtype) if need_dw else None
        db = None
        if need_db:
            db = _torch_dz(grad_out, x, weight, bias, out, activation, slope).sum(0)
        return dx, dw, db
    if not (need_dx or need_dw or need_db):
        return None, None, None
    if _use_narrow(N, K, x, act, mode):
        with _device_guard(x):
            return _narrow_backward(grad_out, x, weight, bias, out, act, mode, slope, need_dx, need_dw, need_db,
                                    splits)

    with _device_guard(x):
        if out is None:
            # recompute=True: one GEMM rebuilds z and its epilogue stores dZ = dY * act'(z).
            dz = torch.empty((M, N), device=dev, dtype=dtype)
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
            _k._linear_act_backward_dz_kernel[grid](
                x, weight, bias if bias is not None else x, grad_out, dz,
                M, N, K,
                x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                bias.stride(0) if bias is not None else 0,
                grad_out.stride(0), grad_out.stride(1), dz.stride(0), dz.stride(1), slope,
                ACT=act, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
            )
            src, v = dz, dz
        else:
            src, v = grad_out, out

        dx = None
        if need_dx:
            s = splits if splits is not None else _num_splits("dx", M, N, K, x.element_size(), dev)
            cols = _split_length(N, s, splits is not None)
            s = triton.cdiv(N, cols)
            dx = torch.empty((M, K), device=dev, dtype=dtype)
            dx_t = dx if s == 1 else torch.empty((s, M, K), device=dev, dtype=_workspace_dtype(dtype))
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]), s)  # noqa: E731
            _k._linear_act_backward_dx_kernel[grid](
                src, v, weight, dx_t,
                M, N, K, cols,
                src.stride(0), src.stride(1), *_v_strides(v), weight.stride(0), weight.stride(1),
                dx_t.stride(0) if s > 1 else 0, dx_t.stride(-2), dx_t.stride(-1), slope,
                ACT=act, MODE=mode, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
            )
            if s > 1:
                _reduce_splits((dx_t,), (dx,))

        dw = db = None
        if need_dw or need_db:
            s = splits if splits is not None else _num_splits("dw", M, N, K, x.element_size(), dev, need_dw)
            rows = _split_length(M, s, splits is not None)
            s = triton.cdiv(M, rows)
            dw, db, dw_t, db_t = _split_outputs(s, N, K, need_dw, need_db, dtype, dev)
            dw_arg = dw_t if dw_t is not None else x
            db_arg = db_t if db_t is not None else x
            if need_dw:
                grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), s)  # noqa: E731
            else:
                grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), s)  # noqa: E731
            _k._linear_act_backward_dw_kernel[grid](
                src, v, x, dw_arg, db_arg,
                M, N, K, rows,
                src.stride(0), src.stride(1), *_v_strides(v), x.stride(0), x.stride(1),
                dw_t.stride(0) if (need_dw and s > 1) else 0,
                dw_t.stride(-2) if need_dw else 0, dw_t.stride(-1) if need_dw else 0,
                db_t.stride(0) if (need_db and s > 1) else 0, db_t.stride(-1) if need_db else 0, slope,
                ACT=act, MODE=mode, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision,
            )
            if s > 1:
                _reduce_splits((dw_t, db_t), (dw, db))
    return dx, dw, db


# ------------------------------------------------------------------------------------------------
# Registered ops.
# ------------------------------------------------------------------------------------------------

def _check_shapes_fake(x, weight, op: str) -> None:
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"{op}: x (M, K) and weight (N, K) must agree on K")


@torch.library.custom_op("fused_backprop::triton_linear_act_fwd", mutates_args=())
def triton_linear_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          activation: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    _check(x, weight, bias, activation, negative_slope, "triton_linear_act_fwd")
    return linear_act_forward(x, weight, bias, activation, negative_slope)


@triton_linear_act_fwd.register_fake
def _triton_linear_act_fwd_fake(x, weight, bias, activation, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    _check_shapes_fake(x, weight, "triton_linear_act_fwd")
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fused_backprop::triton_linear_act_fwd_preact", mutates_args=())
def triton_linear_act_fwd_preact(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 activation: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight, bias, activation, negative_slope, "triton_linear_act_fwd_preact")
    return linear_act_forward(x, weight, bias, activation, negative_slope, return_preact=True)


@triton_linear_act_fwd_preact.register_fake
def _triton_linear_act_fwd_preact_fake(x, weight, bias, activation, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    _check_shapes_fake(x, weight, "triton_linear_act_fwd_preact")
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("fused_backprop::triton_linear_act_bwd", mutates_args=())
def triton_linear_act_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], out: Optional[torch.Tensor], activation: str,
                          output_mask: list[bool], negative_slope: float = DEFAULT_NEGATIVE_SLOPE
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, weight, bias, activation, negative_slope, "triton_linear_act_bwd", grad_out=grad_out, out=out)
    if len(output_mask) != 3:
        raise ValueError(f"triton_linear_act_bwd: output_mask must have 3 entries, got {len(output_mask)}")
    grads = linear_act_backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope)
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)


@triton_linear_act_bwd.register_fake
def _triton_linear_act_bwd_fake(grad_out, x, weight, bias, out, activation, output_mask,
                                negative_slope=DEFAULT_NEGATIVE_SLOPE):
    _check_shapes_fake(x, weight, "triton_linear_act_bwd")
    n = weight.shape[0]
    return (x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,)),
            weight.new_empty(weight.shape) if output_mask[1] else x.new_empty((0,)),
            weight.new_empty((n,)) if output_mask[2] and bias is not None else x.new_empty((0,)))


def _register_autograd() -> None:
    from .. import autograd

    autograd.register_op_autograd("fused_backprop::triton_linear_act_fwd", backend_name="triton")
    autograd.register_preact_op_autograd("fused_backprop::triton_linear_act_fwd_preact")
    autograd.register_backward_op_autograd("fused_backprop::triton_linear_act_bwd")


_register_autograd()
