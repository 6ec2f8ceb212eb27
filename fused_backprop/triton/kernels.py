"""Triton kernels for ``act(x @ W.T + b)`` and its backward.

Shapes: x ``(M, K)``, W ``(N, K)``, b ``(N,)``, y / dY / dZ ``(M, N)``.

* ``_linear_act_forward_kernel``: tiled GEMM over output tiles ``(BLOCK_M, BLOCK_N)``; the bias add
  and the activation run in the epilogue on the fp32 (fp64 for fp64 inputs) accumulator while it is
  still in registers, and the tile is stored once (and z beside it, with ``STORE_PREACT``).
* ``_linear_act_backward_dz_kernel`` (``recompute=True`` only): the same GEMM recomputes the
  pre-activation ``z = x W^T + b`` tile by tile and its epilogue forms ``dZ = dY * act'(z)``, stored
  once; the two backward GEMMs then read dZ instead of (dY, y).
* ``_linear_act_backward_dx_kernel``: ``dX = dZ W`` over output tiles ``(BLOCK_M, BLOCK_K)``,
  reducing over N. Without recompute, dZ is formed inside the operand load from the dY and y (or z,
  or sign mask) tiles (``dY * act'(.)``) and never written to memory. When M*K gives too few tiles
  to fill the GPU (short, wide-reduction shapes), N is split over program columns into fp32
  partials, reduced like dW's below.
* ``_linear_act_backward_dw_kernel``: ``dW = dZ^T x`` over output tiles ``(BLOCK_N, BLOCK_K)``,
  reducing over M; dZ is formed in the operand load the same way, and the same loop reduces
  ``db = sum_m dZ`` from the dZ tiles already in registers (only the ``pid_k == 0`` column of
  programs stores it). When M is long and N*K small, the M reduction is split over ``SPLIT``
  program rows, each writing an fp32 partial to a workspace, and ``_sum_splits_kernel`` adds the
  partials in a fixed order: no atomics anywhere, so every result is bitwise deterministic.
* ``_linear_act_backward_narrow_kernel``: for narrow layers (N, K <= NARROW_MAX) the whole
  backward in one pass over the rows: W and the dW/db partials stay on chip, dZ is formed once per
  row block (from y, or from z recomputed with the x tile it loads anyway) and feeds both dX and
  dW/db, so dY, y and x are each read once (the two-kernel path reads dY and y twice).

All offsets that are multiplied by a stride are int64, every load and store is masked at the
edges, and every stride is passed and used (non-contiguous inputs run without copies).

The activations (every name of ``fused_backprop.activations.NAMES``) and their derivatives are
defined once, in ``_activation`` / ``_activation_grad``, with the formulas and order of operations
of ``csrc/activation.h``. ``negative_slope`` (leaky relu's parameter, ignored by the others) is a
runtime fp64 argument of every kernel, converted once to the accumulation dtype. With
``STORE_PREACT`` the forward epilogue also stores z (``forward_preact``). Backward takes act' from
one source (constexpr MODE): z recomputed from x, W, b (MODE_RECOMPUTE), the layer output y
(MODE_OUTPUT), the pre-activation z (MODE_PREACT: gelu, gelu_tanh, silu, leaky relu with a negative
slope) or the packed 1-bit sign mask (MODE_SIGN_MASK: relu, leaky relu).
"""

from __future__ import annotations

import inspect
import math

import triton
import triton.language as tl

from ..activations import ACTIVATIONS as _SPECS
from ..activations import NAMES

# Activation codes (constexpr ACT): the activation's index in the registry, so that
# fused_backprop.activations stays the one list. The formulas below name each code; a registry
# name they do not handle fails to import here (KeyError) or to compile (the static_asserts).
ACTIVATION_CODES = {name: code for code, name in enumerate(NAMES)}
RELU, SIGMOID, TANH, LEAKY_RELU, GELU, GELU_TANH, SILU = (
    tl.constexpr(ACTIVATION_CODES[name])
    for name in ("relu", "sigmoid", "tanh", "leaky_relu", "gelu", "gelu_tanh", "silu"))

# Where backward takes act' from (constexpr MODE): see the module docstring.
MODE_RECOMPUTE, MODE_OUTPUT, MODE_SIGN_MASK, MODE_PREACT = (tl.constexpr(m) for m in range(4))

# Whether triton.jit builds interpreted functions (TRITON_INTERPRET set before triton was imported):
# decided once, here, when the kernels below are decorated.
INTERPRET = bool(triton.knobs.runtime.interpret)


# --------------------------------------------------------------------------------------------
# Autotuning: configs for Ampere (sm_8x) and Hopper (sm_9x), keyed on ``tune_key``; one small config
# in the interpreter (which would otherwise run, and time, every config in Python).
#
# A tile is (a, b, red): the two output extents and the reduction step. Each kernel names them
# after its own dimensions (ROLES): the forward GEMM's output is (M, N) reducing over K, dX's is
# (M, K) reducing over N, dW's is (N, K) reducing over M. The backward kernels stream two (a, red)
# tiles per step (dY and y), so their tiles keep the reduction step short.
# --------------------------------------------------------------------------------------------

ROLES = {
    "fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "dz": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "dx": ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
    "dw": ("BLOCK_N", "BLOCK_K", "BLOCK_M"),
}
# (a, b, red, num_warps, num_stages) per (role, family). "ampere": A100 (164 KiB shared memory per
# SM, mma.sync); "hopper": H100 (228 KiB, wgmma on warpgroups of 4 warps, deeper pipelines); "fma":
# fp32 with input_precision="ieee" and fp64, which run on the CUDA cores (no tensor-core path), on
# either generation. Every listed config compiles for its target with no register spills and fits
# its shared memory in bf16 (fp32 for "fma"); tests/test_triton.py::test_aot_compile_* checks this
# with Triton's compiler and ptxas, no GPU needed. fp32 with TF32 (set_allow_tf32) uses the
# "ampere"/"hopper" tiles with twice the operand bytes; the shared-memory prune drops those that
# no longer fit.
_FWD_AMPERE = [(256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
               (64, 64, 64, 4, 3), (64, 64, 32, 2, 5), (128, 32, 32, 4, 4), (32, 64, 32, 2, 5)]
_FWD_HOPPER = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
               (64, 64, 64, 4, 4), (128, 64, 128, 8, 3), (64, 64, 128, 4, 3), (64, 32, 64, 4, 4)]
TILES = {
    ("fwd", "ampere"): _FWD_AMPERE + [(128, 128, 32, 4, 4)],
    ("fwd", "hopper"): _FWD_HOPPER + [(128, 128, 64, 4, 4)],
    ("dz", "ampere"): _FWD_AMPERE[1:],
    ("dz", "hopper"): _FWD_HOPPER[1:],
    ("dx", "ampere"): [(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (128, 64, 32, 8, 3),
                       (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (64, 64, 32, 2, 5), (32, 64, 32, 2, 5)],
    ("dw", "ampere"): [(128, 256, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                       (64, 64, 32, 2, 5), (32, 64, 32, 2, 5)],
}
TILES[("dx", "hopper")] = TILES[("dw", "hopper")] = [
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (64, 32, 64, 4, 4), (64, 32, 32, 4, 3)]
FMA_TILES = [(64, 64, 32, 4, 3), (64, 64, 16, 4, 4), (128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 32, 32, 4, 3),
             (32, 64, 32, 4, 3), (32, 32, 32, 2, 3)]
for _role in ROLES:
    TILES[(_role, "fma")] = FMA_TILES
INTERPRETER_TILE = (32, 32, 32, 1, 1)
# Launches whose rows do not start on 16-byte boundaries (``alignment`` times the element size
# under 16 on K or N, e.g. an odd K in bf16) load their operand tiles element by element through
# registers, without cp.async, and then most tiles with a long reduction step spill (up to 13 KB
# on sm_80, 6 KB on sm_90a). Such launches take only these tiles of TILES, compiled spill-free at
# N = 1001, K = 999 in bf16 for the heaviest variants (test_aot_compile_sm80_sm90_no_spills checks
# them); the "fma" family keeps its tiles.
UNALIGNED_TILES = {
    ("fwd", "ampere"): [(64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (64, 64, 32, 2, 5), (128, 32, 32, 4, 4),
                        (32, 64, 32, 2, 5)],
    ("fwd", "hopper"): [(64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (64, 32, 64, 4, 4)],
    ("dx", "ampere"): [(128, 64, 32, 8, 3), (32, 64, 32, 2, 5)],
    ("dx", "hopper"): [(64, 32, 32, 4, 3)],
    ("dw", "ampere"): [(32, 64, 32, 2, 5)],
    ("dw", "hopper"): [(128, 128, 64, 8, 3), (64, 32, 32, 4, 3)],
}
UNALIGNED_TILES[("dz", "ampere")] = UNALIGNED_TILES[("fwd", "ampere")]
UNALIGNED_TILES[("dz", "hopper")] = UNALIGNED_TILES[("fwd", "hopper")]
# Register spills. Beyond the tile, what decides a launch's register use is its "variant"
# (``spill_variant``): the activation, and where act' comes from or whether the forward stores z
# too (gelu's erf and gelu_tanh's tanh in an epilogue over a whole accumulator tile, or the bit
# spread of the sign mask, need more registers than relu's select). SPILLS[(role, family, tile)]
# names the variants whose ptxas report for that config shows spill stores (on sm_80 or sm_90 for
# "fma"); the autotuner's pruning drops the config for them. Found, and checked to be exact, by
# tests/test_triton.py::test_aot_compile_sm80_sm90_no_spills with FUSED_BACKPROP_AOT_ALL=1, which
# prints the table to paste here when it is out of date. The narrow kernel's tiles are
# (BLOCK_M, num_warps, num_stages) on "hopper", the only place it runs on a GPU.
SPILLS: dict[tuple, frozenset] = {
    ('dw', 'ampere', (32, 64, 32, 2, 5)): frozenset(['gelu_tanh:preact']),
    ('dw', 'ampere', (64, 64, 32, 2, 5)): frozenset(['gelu:preact', 'gelu_tanh:preact']),
    ('dw', 'ampere', (64, 64, 64, 4, 3)): frozenset(['gelu:preact']),
    ('dw', 'ampere', (64, 128, 32, 4, 4)): frozenset(['gelu:preact', 'gelu_tanh:preact']),
    ('dw', 'ampere', (128, 64, 32, 4, 4)): frozenset(['gelu:preact', 'gelu_tanh:preact']),
    ('dw', 'ampere', (128, 256, 32, 8, 3)): frozenset(['gelu:preact', 'gelu_tanh:preact', 'silu:preact']),
    ('dw', 'fma', (64, 64, 32, 4, 3)): frozenset(['leaky_relu:mask', 'relu:mask']),
    ('dw', 'fma', (64, 128, 16, 8, 3)): frozenset(['dz']),
    ('dw', 'fma', (128, 64, 16, 8, 3)): frozenset(['dz', 'relu:output', 'tanh:output']),
    ('dw', 'hopper', (64, 64, 128, 4, 3)):
        frozenset(['gelu:preact', 'gelu_tanh:preact', 'leaky_relu:mask-bits', 'relu:mask-bits']),
    ('dw', 'hopper', (64, 128, 64, 4, 4)): frozenset(['gelu_tanh:preact']),
    ('dw', 'hopper', (128, 64, 64, 4, 4)):
        frozenset(['gelu:preact', 'gelu_tanh:preact', 'leaky_relu:mask-bits', 'relu:mask-bits']),
    ('dw', 'hopper', (128, 128, 32, 4, 4)): frozenset(['gelu:preact', 'leaky_relu:mask-bits', 'relu:mask-bits']),
    ('dw', 'hopper', (128, 128, 64, 8, 3)): frozenset(['gelu_tanh:preact']),
    ('dw', 'hopper', (128, 256, 64, 8, 3)): frozenset(['gelu:preact', 'leaky_relu:mask-bits', 'relu:mask-bits']),
    ('dx', 'ampere', (64, 64, 32, 2, 5)): frozenset(['gelu_tanh:preact', 'relu:mask', 'relu:mask-bits']),
    ('dx', 'ampere', (64, 64, 64, 4, 3)): frozenset(['leaky_relu:mask-bits']),
    ('dx', 'ampere', (64, 128, 32, 4, 4)): frozenset(['gelu_tanh:preact']),
    ('dx', 'ampere', (128, 128, 32, 4, 4)): frozenset(['gelu:preact', 'gelu_tanh:preact']),
    ('dx', 'ampere', (128, 128, 64, 8, 3)): frozenset(['gelu:preact', 'gelu_tanh:preact', 'silu:preact']),
    ('dx', 'ampere', (128, 256, 32, 8, 3)): frozenset(['gelu:preact', 'gelu_tanh:preact']),
    ('dx', 'fma', (64, 32, 32, 4, 3)): frozenset(['relu:mask-bits']),
    ('dx', 'fma', (64, 64, 16, 4, 4)):
        frozenset(['leaky_relu:mask-bits', 'leaky_relu:output', 'leaky_relu:preact', 'relu:mask-bits']),
    ('dx', 'fma', (64, 64, 32, 4, 3)): frozenset(['dz', 'relu:output', 'tanh:output']),
    ('dx', 'hopper', (128, 64, 64, 4, 4)):
        frozenset(['gelu:preact', 'gelu_tanh:preact', 'relu:mask-bits', 'silu:preact']),
    ('dx', 'hopper', (128, 128, 32, 4, 4)): frozenset(['gelu_tanh:preact']),
    ('dz', 'hopper', (128, 64, 64, 4, 4)): frozenset(['gelu']),
    ('fwd', 'ampere', (128, 128, 32, 4, 4)):
        frozenset(['gelu', 'gelu+z', 'gelu_tanh', 'gelu_tanh+z', 'leaky_relu+z', 'silu+z']),
    ('fwd', 'ampere', (256, 128, 64, 8, 3)):
        frozenset(['gelu', 'gelu+z', 'gelu_tanh', 'gelu_tanh+z', 'leaky_relu+z', 'silu+z']),
    ('fwd', 'fma', (64, 32, 32, 4, 3)): frozenset(['gelu']),
    ('fwd', 'hopper', (128, 128, 64, 4, 4)): frozenset(['gelu', 'gelu+z', 'gelu_tanh+z', 'leaky_relu+z', 'silu+z']),
    ('fwd', 'hopper', (128, 256, 64, 8, 3)): frozenset(['gelu', 'gelu+z', 'gelu_tanh+z', 'leaky_relu+z', 'silu+z']),
    ('narrow', 'hopper', (64, 4, 3)):
        frozenset(['gelu:preact', 'gelu_tanh:preact', 'gelu_tanh:recompute', 'silu:preact']),
    ('narrow', 'hopper', (128, 8, 3)): frozenset(['gelu:preact', 'gelu_tanh:preact', 'silu:preact']),
}

# Largest reduction step of a dW or dX config: the dW (dX) split is a multiple of it, so every config
# tiles a split.
MAX_BLOCK_RED = 256

_FAMILY: dict[int, str] = {}  # id(config) -> "ampere" | "hopper" | "fma"


def _make_configs(role: str) -> list:
    names = ROLES[role]
    if INTERPRET:
        a, b, red, w, st = INTERPRETER_TILE
        return [triton.Config({names[0]: a, names[1]: b, names[2]: red, "GROUP": 4}, num_warps=w, num_stages=st)]
    out = []
    for family in ("ampere", "hopper", "fma"):
        for a, b, red, w, st in TILES[(role, family)]:
            c = triton.Config({names[0]: a, names[1]: b, names[2]: red, "GROUP": 8}, num_warps=w, num_stages=st)
            _FAMILY[id(c)] = family
            out.append(c)
    return out


def config_tile(role: str, c) -> tuple:
    """(a, b, red, num_warps, num_stages) of a config of the kernel with this role
    ((BLOCK_M, num_warps, num_stages) for "narrow")."""
    names = ("BLOCK_M",) if role == "narrow" else ROLES[role]
    return (*(c.kwargs[n] for n in names), c.num_warps, c.num_stages)


_SOURCES = ("recompute", "output", "mask", "preact")  # the MODEs by value, as spill_variant names them


def spill_variant(role: str, constexprs: dict) -> str:
    """The variant of a launch of the kernel with this role (see SPILLS), from its constexprs:
    "gelu" / "gelu+z" (forward storing z) for "fwd", the activation for "dz", "<act>:<source of act'>"
    for "dx", "dw" and "narrow" ("<act>:mask-bits" for a sign mask read bit by bit: not BYTE_ROWS),
    "dz" for dX / dW reading a dZ the dz kernel formed."""
    name = NAMES[constexprs["ACT"]]
    if role == "fwd":
        return name + "+z" if constexprs.get("STORE_PREACT") else name
    if role == "dz":
        return name
    mode = constexprs["MODE"]
    if mode == MODE_RECOMPUTE.value and role != "narrow":
        return "dz"
    if mode == MODE_SIGN_MASK.value and not constexprs.get("BYTE_ROWS", True):
        return f"{name}:mask-bits"
    return f"{name}:{_SOURCES[mode]}"


def launch_variants(role: str) -> list[dict]:
    """The constexprs (ACT and MODE / STORE_PREACT) of every variant the backend launches the
    kernel with: what SPILLS covers. act' comes from y where the registry has a derivative from
    the output, from z where some slope keeps z (leaky relu's negative ones), from the sign mask
    where the sign decides, and from z recomputed."""
    out = []
    for name, code in ACTIVATION_CODES.items():
        spec = _SPECS[name]
        keeps_z = spec.grad_from_output is None or not spec.output_decides(-1.0)
        if role == "fwd":
            out += [dict(ACT=code, STORE_PREACT=False)] + ([dict(ACT=code, STORE_PREACT=True)] if keeps_z else [])
            continue
        if role == "dz":
            out.append(dict(ACT=code))
            continue
        modes = [MODE_RECOMPUTE] if role == "narrow" else []
        modes += [MODE_OUTPUT] if spec.grad_from_output is not None else []
        modes += [MODE_SIGN_MASK] if spec.sign_decides else []
        modes += [MODE_PREACT] if keeps_z else []
        out += [dict(ACT=code, MODE=m.value) for m in modes]
        if spec.sign_decides:
            out.append(dict(ACT=code, MODE=MODE_SIGN_MASK.value, BYTE_ROWS=False))
    if role in ("dx", "dw"):
        out.insert(0, dict(ACT=0, MODE=MODE_RECOMPUTE.value))
    return out


def spill_free(role: str, family: str, tile: tuple, variant: str) -> bool:
    return variant not in SPILLS.get((role, family, tile), ())


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def smem_estimate(role: str, a: int, b: int, red: int, stages: int, itemsize: int) -> int:
    """Shared memory a pipelined config needs, at most: ``stages`` copies of one step's operand tiles
    (Ampere pipelines keep stages - 1 of them)."""
    per_step = (a * red + red * b) if role in ("fwd", "dz") else (2 * a * red + red * b)
    return stages * per_step * itemsize


# SM counts the launch shapes are checked against (tests/test_triton.py): A100, H100 SXM.
SM_COUNTS = {"A100": 108, "H100": 132}
# Rows the autotuner's key rounds M up to (``m_bucket``), at most: beyond it every config fills
# the GPU many times over and the best one no longer depends on M.
M_BUCKET_CAP = 8192
# Output extents and reduction length of each role's GEMM (dW with db only: one column of tiles).
DIMS = {"fwd": ("M", "N", "K"), "dz": ("M", "N", "K"), "dx": ("M", "K", "N"), "dw": ("N", "K", "M")}


def m_bucket(m: int) -> int:
    """The M a launch is tuned for: the next power of two, capped at M_BUCKET_CAP, so a new batch
    size re-tunes only when it crosses a power of two (and never past the cap)."""
    return min(_next_pow2(m), M_BUCKET_CAP)


def programs(role: str, shape: dict, tile: tuple, splits: int = 1, compute_dw: bool = True) -> int:
    """Programs of one launch of this role's kernel at ``shape`` (M, N, K by name) with this config
    tile: output tiles times the splits of the reduction (dX over N, dW/db over M)."""
    a, b = (shape[d] for d in DIMS[role][:2])
    tiles = triton.cdiv(a, tile[0]) * (triton.cdiv(b, tile[1]) if role != "dw" or compute_dw else 1)
    return tiles * splits


def reduction_splits(out_tiles: int, length: int, ws_per_split: int, bytes_read: int, sms: int) -> int:
    """How many pieces a GEMM's reduction (of ``length``) is split into so that ``out_tiles``
    output tiles (64x64: the smallest common tile) make about two programs per SM: 1 when they
    already fill the SMs; else at least 1024 of the reduction per piece and the fp32 workspace
    (``ws_per_split`` bytes a piece) under 1/8 of the bytes the kernel reads. dW/db split M (the
    epilogue-free reduction); dX splits N, the forward and dz cannot (their epilogue is not linear)
    and take the smallest tiles instead (``prune_tiles``)."""
    if out_tiles >= sms:
        return 1
    want = triton.cdiv(2 * sms, out_tiles)
    return max(1, min(want, length // 1024, bytes_read // 8 // max(ws_per_split, 1)))


def prune_tiles(role: str, family: str, shape: dict, itemsize: int, variant: str, sms: int, smem: int,
                splits: int = 1, compute_dw: bool = True, aligned: bool = True) -> list[tuple]:
    """The tiles of TILES[(role, family)] the autotuner times for this launch: those that do not
    spill for its variant (SPILLS; only UNALIGNED_TILES where rows are not ``aligned``), fit the
    shared memory, whose output tiles do not overshoot the problem (a 256-wide tile on a 64-wide
    dimension only adds masked work) and whose reduction step does not exceed the reduction length;
    of those, the ones whose grid fills the ``sms`` SMs, or, where none does, the ones with the most
    programs (an under-filled grid runs for as long as one program does). Each rule falls back to
    its input if it would leave nothing."""
    tiles = TILES[(role, family)]
    if not aligned:
        tiles = [t for t in tiles if t in UNALIGNED_TILES.get((role, family), tiles)] or tiles
    tiles = [t for t in tiles if spill_free(role, family, t, variant)] or tiles
    size = lambda t: smem_estimate(role, *t[:3], t[4], itemsize)  # noqa: E731
    tiles = [t for t in tiles if size(t) <= smem] or [min(tiles, key=size)]
    caps = [max(16, _next_pow2(shape[d])) for d in DIMS[role]]
    if role == "dw":
        caps[2] = MAX_BLOCK_RED
    fit = [t for t in tiles if all(v <= cap for v, cap in zip(t, caps))]
    tiles = fit or [min(tiles, key=lambda t: t[0] * t[1] * t[2])]
    count = {t: programs(role, shape, t, splits, compute_dw) for t in tiles}
    full = [t for t in tiles if count[t] >= sms]
    return full or [t for t in tiles if count[t] == max(count.values())]


def _prune(role: str):
    """early_config_prune: the configs of this GPU generation ("fma" ones for fp32-ieee and fp64)
    that ``prune_tiles`` keeps for this launch, M rounded as the autotuner's key rounds it."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET or len(configs) == 1:
            return configs
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        family = "hopper" if props.major >= 9 else "ampere"
        smem = getattr(props, "shared_memory_per_block_optin", 0) or (227 if family == "hopper" else 163) * 1024
        itemsize = next((a.element_size() for a in named_args.values() if hasattr(a, "element_size")), 2)
        if kwargs.get("INPUT_PRECISION", "ieee") == "ieee" and itemsize >= 4:
            family = "fma"
        variant = spill_variant(role, dict(kwargs, BYTE_ROWS=_byte_rows(named_args)))
        shape = dict(M=m_bucket(named_args["M"]), N=named_args["N"], K=named_args["K"])
        per_split = named_args.get("rows_per_split", named_args.get("cols_per_split"))
        splits = triton.cdiv(named_args[DIMS[role][2]], per_split) if per_split else 1
        aligned = min(alignment(named_args, "K"), alignment(named_args, "N")) * itemsize >= 16
        keep = set(prune_tiles(role, family, shape, itemsize, variant, props.multi_processor_count, smem, splits,
                               kwargs.get("COMPUTE_DW", True), aligned))
        return [c for c in configs if _FAMILY.get(id(c)) == family and config_tile(role, c) in keep] or configs

    return prune


# --------------------------------------------------------------------------------------------
# The autotuner: triton.autotune with a cache key of its own (``tune_key``) and no timing runs
# during CUDA-graph capture.
# --------------------------------------------------------------------------------------------

def _int_class(v: int) -> tuple:
    """What Triton specialises an int argument on (1, divisibility by 16) and ALIGN_* hints (its
    power-of-two part, up to 16)."""
    return (v == 1, min(16, v & -v) if v else 16)


def tune_key(named_args: dict, constexprs) -> tuple:
    """The autotuner's cache key of a launch with these named arguments: everything that changes
    the compiled kernel or what is fastest. Every constexpr the caller passes (``constexprs``: ACT,
    MODE, INPUT_PRECISION, COMPUTE_DW, COMPUTE_DB, HAS_BIAS, ...), N and K, M's bucket
    (``m_bucket``), each tensor's dtype and 16-byte alignment, and each other int argument's
    ``_int_class`` (strides; the split lengths). Leaky relu's slope does not count."""
    key = []
    for name, v in named_args.items():
        if name in constexprs or name in ("N", "K"):
            key.append((name, v))
        elif name == "M":
            key.append((name, m_bucket(v)))
        elif hasattr(v, "data_ptr"):
            key.append((name, str(v.dtype), v.data_ptr() % 16 == 0))
        elif isinstance(v, int):
            key.append((name, _int_class(v)))
    return tuple(key)


def _capturing() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Tuner(triton.runtime.Autotuner):
    """triton.autotune keyed on ``tune_key``. A launch whose key is not cached yet is timed over the
    pruned configs, except while a CUDA graph is being captured (a timing run would break the
    capture): then it runs the first config the pruning leaves, and caches nothing."""

    def __init__(self, fn, configs, prune):
        super().__init__(fn, fn.arg_names, configs, [], None, None, prune_configs_by={"early_config_prune": prune})
        params = inspect.signature(self.base_fn).parameters  # base_fn: the Python function under the decorators
        self.constexprs = frozenset(n for n, p in params.items() if "constexpr" in str(p.annotation))

    def run(self, *args, **kwargs):
        if len(self.configs) == 1:
            config = self.configs[0]
        else:
            self.nargs = dict(zip(self.arg_names, args))
            named = {**self.nargs, **kwargs}
            key = tune_key({n: named[n] for n in self.arg_names if n in named}, self.constexprs)
            config = self.cache.get(key)
            if config is None:
                pruned = self.prune_configs(kwargs)
                if len(pruned) == 1 or _capturing():
                    config = pruned[0]
                else:
                    timings = {c: self._bench(*args, config=c, **kwargs) for c in pruned}
                    config = min(timings, key=timings.get)
                if len(pruned) == 1 or not _capturing():
                    self.cache[key] = config
        self.best_config = config
        self.nargs = None
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


def _autotune(role: str):
    return lambda fn: Tuner(fn, _make_configs(role), _prune(role))


# --------------------------------------------------------------------------------------------
# The activations and their derivatives: the one definition every kernel uses. Each formula is
# that of csrc/activation.h (torch's own, ATen's Activation.cpp / GeluKernel.cpp), in the same
# order of operations, on the accumulator dtype (fp32, fp64 for fp64 inputs). The named constants
# stand on the right of their products (c * v is written v * c: the same IEEE result), because
# under the interpreter a tl.constexpr on the left wraps the tensor instead of multiplying it.
# --------------------------------------------------------------------------------------------

_SQRT_HALF = tl.constexpr(0.70710678118654752440)      # M_SQRT1_2
_INV_SQRT_2PI = tl.constexpr(0.39894228040143267794)   # M_2_SQRTPI * M_SQRT1_2 * 0.5
_BETA = tl.constexpr(0.79788456080286535588)           # M_SQRT2 * M_2_SQRTPI * 0.5
_KAPPA = tl.constexpr(0.044715)
_KAPPA3 = tl.constexpr(3 * 0.044715)
# Below this |z|, tanh is the Taylor polynomial (see _tanh).
_TANH_POLY_MAX = tl.constexpr(0.25)


@triton.jit
def _slope(negative_slope, like):
    """Leaky relu's slope (an fp64 kernel argument; a Python float under the interpreter) in the
    dtype of ``like``: one rounding of the double, as torch's ``negval`` for fp32 math."""
    return tl.full((), negative_slope, like.dtype)


@triton.jit
def _sigmoid(z):
    """1 / (1 + e^-z), exact at both ends: e^-z overflows to inf for z << 0 giving 0, underflows to 0
    for z >> 0 giving 1; no inf/inf is ever formed."""
    return 1.0 / (1.0 + tl.exp(0.0 - z))


@triton.jit
def _tanh_exp(z):
    """sign(z) (1 - e) / (1 + e) with e = exp(-2|z|) in [0, 1]: no overflow, exactly +-1 at +-inf
    (and wherever e is below half an ulp), NaN propagates; within a few ulp of tanh in absolute
    terms everywhere, but not in relative terms for |z| << 1 (1 - e cancels). gelu_tanh uses it
    as is (it needs 1 + tanh(u), and 1 - tanh(u)^2: absolute accuracy), which keeps its epilogue
    small; tanh itself adds the polynomial of ``_tanh`` near 0."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _tanh(z):
    """tanh(z) from tl.exp (libdevice's tanh does not run in the interpreter; one formula serves
    both), within about 2 ulp of the correctly rounded value in fp32 and fp64.
    |z| < 0.25: the odd Taylor polynomial z (1 + z^2 P(z^2)) up to z^19 (truncation below 1e-17
    relative); z times (1 + ...) keeps the sign of -0. Otherwise ``_tanh_exp`` (NaN too: NaN < 0.25
    is false)."""
    z2 = z * z
    p = -0.00023912911424355248
    p = p * z2 + 0.000590027440945586
    p = p * z2 - 0.0014558343870513183
    p = p * z2 + 0.003592128036572481
    p = p * z2 - 0.008863235529902197
    p = p * z2 + 0.021869488536155203
    p = p * z2 - 0.05396825396825397
    p = p * z2 + 0.13333333333333333
    p = p * z2 - 0.3333333333333333
    return tl.where(tl.abs(z) < _TANH_POLY_MAX, z * (1.0 + z2 * p), _tanh_exp(z))


@triton.jit
def _activation(z, negative_slope, ACT: tl.constexpr):
    """act(z). relu: z < 0 ? 0 : z, so NaN and -0 pass through as in torch.relu (tl.maximum would
    drop NaN); leaky relu: z > 0 ? z : a z; gelu: z/2 (1 + erf(z / sqrt 2)); gelu_tanh:
    z/2 (1 + tanh(beta (z + kappa z^3))); silu: z / (1 + e^-z).

    Where torch's CPU result at an infinity is an artefact of its vectorised math rather than the
    limit, this gives the value of the formula, which is torch's float64 (and scalar) result: gelu
    at +inf is +inf (torch's fp32 CPU kernel, whose vectorised erf gives NaN there, returns NaN; its
    fp64 one returns inf). At -inf gelu, gelu_tanh and silu are NaN (-inf * 0, -inf / inf), as in
    torch at every dtype."""
    if ACT == RELU:
        return tl.where(z < 0, 0.0, z)
    elif ACT == SIGMOID:
        return _sigmoid(z)
    elif ACT == TANH:
        return _tanh(z)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, z, z * _slope(negative_slope, z))
    elif ACT == GELU:
        return z * 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF))
    elif ACT == GELU_TANH:
        return 0.5 * z * (1.0 + _tanh_exp((z + (z * z * z) * _KAPPA) * _BETA))
    elif ACT == SILU:
        return z / (1.0 + tl.exp(0.0 - z))
    else:
        tl.static_assert(False, "_activation: unknown activation code")


@triton.jit
def _activation_grad(v, negative_slope, FROM_OUTPUT: tl.constexpr, ACT: tl.constexpr):
    """act'(z) from the layer output y (FROM_OUTPUT: relu, sigmoid, tanh, leaky relu with a >= 0)
    or from the pre-activation z.
    relu: 0 where v <= 0, else 1, so relu'(0) = 0 and a NaN lets the gradient through as torch's
    threshold_backward does (y <= 0 exactly where z <= 0); leaky relu: 1 where v > 0, else a (at 0
    and NaN too, as leaky_relu_backward; for a >= 0, y > 0 exactly where z > 0); sigmoid: s (1 - s);
    tanh: 1 - t^2; gelu: Phi(z) + z phi(z); gelu_tanh: (1 + t)/2 + z/2 (1 - t^2) u';
    silu: s (1 + z (1 - s))."""
    if ACT == RELU:
        return tl.where(v <= 0, 0.0, 1.0).to(v.dtype)
    elif ACT == SIGMOID:
        if FROM_OUTPUT:
            s = v
        else:
            s = _sigmoid(v)
        return s * (1.0 - s)
    elif ACT == TANH:
        if FROM_OUTPUT:
            t = v
        else:
            t = _tanh(v)
        return 1.0 - t * t
    elif ACT == LEAKY_RELU:
        return tl.where(v > 0, 1.0, _slope(negative_slope, v))
    else:
        tl.static_assert(not FROM_OUTPUT, "_activation_grad: this activation's derivative needs the pre-activation")
        if ACT == GELU:
            cdf = 0.5 * (1.0 + tl.math.erf(v * _SQRT_HALF))
            pdf = tl.exp(v * v * -0.5) * _INV_SQRT_2PI
            return cdf + v * pdf
        elif ACT == GELU_TANH:
            z_sq = v * v
            t = _tanh_exp((v + (z_sq * v) * _KAPPA) * _BETA)
            left = 0.5 * v
            right = 1.0 + t
            du = (1.0 + z_sq * _KAPPA3) * _BETA
            return 0.5 * right + left * (1.0 - t * t) * du
        elif ACT == SILU:
            s = _sigmoid(v)
            return s * (1.0 + v * (1.0 - s))
        else:
            tl.static_assert(False, "_activation_grad: unknown activation code")


@triton.jit
def _grad_preact(dy, v, negative_slope, MODE: tl.constexpr, ACT: tl.constexpr):
    """dZ from the loaded tiles (already in the accumulation dtype). MODE_RECOMPUTE: v is unused, dy
    is dZ (formed earlier by the dz kernel); MODE_OUTPUT / MODE_PREACT: dY * act'(v) with v the
    layer output y / the pre-activation z; MODE_SIGN_MASK: v is the sign bit (0/1, from ``_load_v``):
    dZ = dY where it is set, else 0 (relu, also for a NaN dY, as threshold_backward) or a dY (leaky
    relu)."""
    if MODE == MODE_RECOMPUTE:
        return dy
    elif MODE == MODE_SIGN_MASK:
        if ACT == RELU:
            return tl.where(v != 0, dy, 0.0)
        elif ACT == LEAKY_RELU:
            return tl.where(v != 0, dy, dy * _slope(negative_slope, dy))
        else:
            tl.static_assert(False, "_grad_preact: a sign mask serves relu and leaky relu only")
    else:
        return dy * _activation_grad(v, negative_slope, MODE == MODE_OUTPUT, ACT)


@triton.jit
def _load_v(v_ptr, offs_m, mask_m, n0, offs_n, stride_vm, stride_vn, N, mask, MODE: tl.constexpr,
            BYTE_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile at rows offs_m, columns n0 + [0, BLOCK_N) that act' is taken
    from: y or z (MODE_OUTPUT / MODE_PREACT), or (MODE_SIGN_MASK) the packed 1-bit sign mask of the
    contiguous (M, N) output (``fused_backprop.sign_mask``: bit e % 8 of byte e // 8 is element
    e = m * N + n), read directly instead of an unpacked copy, as 0/1. With BYTE_ROWS (N % 8 == 0:
    every row starts on a byte) the tile is a contiguous [BLOCK_M, BLOCK_N / 8] byte load whose bits
    are spread by a broadcast shift (no per-element gather); otherwise each element reads its
    byte and shifts out its bit."""
    if MODE == MODE_SIGN_MASK:
        if BYTE_ROWS:
            cols = n0 // 8 + tl.arange(0, BLOCK_N // 8)
            byte = tl.load(v_ptr + ((offs_m * N) >> 3)[:, None] + cols[None, :],
                           mask=mask_m[:, None] & (cols < N // 8)[None, :], other=0)
            bits = (byte[:, :, None] >> tl.arange(0, 8).to(tl.uint8)[None, None, :]) & 1
            return tl.reshape(bits, (BLOCK_M, BLOCK_N)).to(ACC_DTYPE)
        else:
            e = offs_m[:, None] * N + offs_n[None, :]
            byte = tl.load(v_ptr + (e >> 3), mask=mask, other=0)
            return ((byte >> (e & 7).to(tl.uint8)) & 1).to(ACC_DTYPE)
    else:
        return tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn,
                       mask=mask, other=0.0).to(ACC_DTYPE)


# --------------------------------------------------------------------------------------------
# Shared tile helpers.
# --------------------------------------------------------------------------------------------

@triton.jit
def _grouped_tile(pid, size_a, size_b, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, GROUP: tl.constexpr):
    """(pid_a, pid_b) of a 1-D launch over a (cdiv(size_a, BLOCK_A), cdiv(size_b, BLOCK_B)) tile
    grid, walked in groups of GROUP rows of tiles so neighbouring programs share operand tiles
    in L2 (the Triton matmul tutorial's swizzle)."""
    num_a = tl.cdiv(size_a, BLOCK_A)
    num_b = tl.cdiv(size_b, BLOCK_B)
    per_group = GROUP * num_b
    group_id = pid // per_group
    first_a = group_id * GROUP
    group_size = tl.minimum(num_a - first_a, GROUP)
    pid_a = first_a + ((pid % per_group) % group_size)
    pid_b = (pid % per_group) // group_size
    return pid_a, pid_b


@triton.jit
def _xwT_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
              ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = x[offs_m, :] @ W[offs_n, :]^T, accumulated in ACC_DTYPE."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm          # int64 offsets (offs_* are int64)
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        if EVEN_K:
            a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
            b = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = offs_k < K
            a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _preact_tile(x_ptr, w_ptr, b_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_b,
                 HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr):
    """This program's tile of the pre-activation z = x W^T + b (ACC_DTYPE, in registers), with its
    row and column offsets and the (M, N) bounds mask: the forward and the recompute dZ kernel."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    z = _xwT_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                  ACC_DTYPE, INPUT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(ACC_DTYPE)
        z = z + bias[None, :]
    return z, offs_m, offs_n, (offs_m < M)[:, None] & mask_n[None, :]


_EVEN_K = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})


def _byte_rows(a) -> bool:
    """Whether a packed sign mask's rows start on whole bytes (N % 8 == 0): see ``_load_v``."""
    return a["N"] % 8 == 0


# Alignment (constexprs ALIGN_K, ALIGN_N). Triton specialises an int argument only on "divisible by
# 16", so with K = 1000 the compiler cannot tell that x's rows start on 16-byte boundaries, nor that
# the K-edge mask is constant over 8 columns: it falls back to 2-byte loads without cp.async (and
# spills). Each kernel therefore takes, per minor dimension, the largest power of two (at most 16)
# that divides the extent and every row stride along it (and dX's split length along N), and states
# it with ``_multiple``.
ROW_STRIDES = {"K": ("stride_xm", "stride_wn", "stride_dxm", "stride_dxs", "stride_dwn", "stride_dws"),
               "N": ("stride_om", "stride_pm", "stride_dym", "stride_dzm", "stride_vm", "stride_dbs",
                     "cols_per_split")}


def alignment(args: dict, dim: str) -> int:
    """ALIGN_K (dim "K") / ALIGN_N ("N") of a launch with these named arguments."""
    g = math.gcd(args[dim], *(args[s] for s in ROW_STRIDES[dim] if s in args))
    return min(16, g & -g) if g else 16


_ALIGN = triton.heuristics({"ALIGN_K": lambda a: alignment(a, "K"), "ALIGN_N": lambda a: alignment(a, "N")})


@triton.jit
def _multiple(v, A: tl.constexpr):
    """The int argument v as int64, with the compiler told it is a multiple of A (what ``alignment``
    guarantees). The hint goes on the widening cast: on an argument itself Triton drops it."""
    return tl.multiple_of(v.to(tl.int64), A)


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------

@_autotune("fwd")
@_EVEN_K
@_ALIGN
@triton.jit
def _linear_act_forward_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, preact_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_om, stride_on, stride_pm, stride_pn,
    negative_slope: tl.float64,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PREACT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, ALIGN_K: tl.constexpr, ALIGN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    K, stride_xm, stride_wn = _multiple(K, ALIGN_K), _multiple(stride_xm, ALIGN_K), _multiple(stride_wn, ALIGN_K)
    N, stride_om, stride_pm = _multiple(N, ALIGN_N), _multiple(stride_om, ALIGN_N), _multiple(stride_pm, ALIGN_N)
    z, offs_m, offs_n, mask = _preact_tile(x_ptr, w_ptr, b_ptr, M, N, K, stride_xm, stride_xk, stride_wn,
                                           stride_wk, stride_b, HAS_BIAS, ACC_DTYPE, INPUT_PRECISION, EVEN_K,
                                           BLOCK_M, BLOCK_N, BLOCK_K, GROUP)
    # Epilogue, on the accumulator in registers: activation, one store (two with STORE_PREACT:
    # z first, for the backward of the activations whose derivative needs it).
    if STORE_PREACT:
        tl.store(preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                 z.to(preact_ptr.dtype.element_ty), mask=mask)
    y = _activation(z, negative_slope, ACT)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------------

@_autotune("dz")
@_EVEN_K
@_ALIGN
@triton.jit
def _linear_act_backward_dz_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, dz_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_dym, stride_dyn, stride_dzm, stride_dzn,
    negative_slope: tl.float64,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr, ALIGN_K: tl.constexpr, ALIGN_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """recompute=True: z = x W^T + b recomputed tile by tile; the epilogue forms dZ = dY * act'(z)."""
    K, stride_xm, stride_wn = _multiple(K, ALIGN_K), _multiple(stride_xm, ALIGN_K), _multiple(stride_wn, ALIGN_K)
    N, stride_dym, stride_dzm = _multiple(N, ALIGN_N), _multiple(stride_dym, ALIGN_N), _multiple(stride_dzm, ALIGN_N)
    z, offs_m, offs_n, mask = _preact_tile(x_ptr, w_ptr, b_ptr, M, N, K, stride_xm, stride_xk, stride_wn,
                                           stride_wk, stride_b, HAS_BIAS, ACC_DTYPE, INPUT_PRECISION, EVEN_K,
                                           BLOCK_M, BLOCK_N, BLOCK_K, GROUP)
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
    dz = dy.to(ACC_DTYPE) * _activation_grad(z, negative_slope, False, ACT)
    tl.store(dz_ptr + offs_m[:, None] * stride_dzm + offs_n[None, :] * stride_dzn,
             dz.to(dz_ptr.dtype.element_ty), mask=mask)


@_autotune("dx")
@triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["cols_per_split"] % a["BLOCK_N"] == 0,
                    "BYTE_ROWS": _byte_rows})
@_ALIGN
@triton.jit
def _linear_act_backward_dx_kernel(
    dy_ptr, v_ptr, w_ptr, dx_ptr,
    M, N, K, cols_per_split,
    stride_dym, stride_dyn, stride_vm, stride_vn, stride_wn, stride_wk, stride_dxs, stride_dxm, stride_dxk,
    negative_slope: tl.float64,
    ACT: tl.constexpr, MODE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EVEN_N: tl.constexpr, BYTE_ROWS: tl.constexpr, ALIGN_K: tl.constexpr, ALIGN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dX[BLOCK_M, BLOCK_K] = sum_n dZ[:, n] W[n, :] over the columns [s * cols_per_split,
    (s + 1) * cols_per_split) of split s = program_id(1), dZ = dY * act'(.) formed in the operand
    load from y, z or the packed sign mask (MODE), or read as is (MODE_RECOMPUTE: dy_ptr holds dZ).
    Split s stores to dx_ptr + s * stride_dxs: a partial when there is more than one split (dX
    of short, wide-reduction shapes, which have too few output tiles to fill the GPU)."""
    K, stride_wn, stride_dxm = _multiple(K, ALIGN_K), _multiple(stride_wn, ALIGN_K), _multiple(stride_dxm, ALIGN_K)
    stride_dxs = _multiple(stride_dxs, ALIGN_K)
    N, stride_dym, stride_vm = _multiple(N, ALIGN_N), _multiple(stride_dym, ALIGN_N), _multiple(stride_vm, ALIGN_N)
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    cols_per_split = _multiple(cols_per_split, ALIGN_N)
    n_start = tl.program_id(1).to(tl.int64) * cols_per_split
    n_end = tl.multiple_of(tl.minimum(n_start + cols_per_split, N), ALIGN_N)  # both are multiples of it
    dy_rows = dy_ptr + offs_m[:, None] * stride_dym
    w_cols = w_ptr + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        if EVEN_N:
            mask_mn = mask_m[:, None]
            mask_nk = mask_k[None, :]
        else:
            mask_n = offs_n < n_end
            mask_mn = mask_m[:, None] & mask_n[None, :]
            mask_nk = mask_n[:, None] & mask_k[None, :]
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=mask_mn, other=0.0).to(ACC_DTYPE)
        if MODE == MODE_RECOMPUTE:
            v = dy
        else:
            v = _load_v(v_ptr, offs_m, mask_m, n0, offs_n, stride_vm, stride_vn, N, mask_mn, MODE, BYTE_ROWS,
                        ACC_DTYPE, BLOCK_M, BLOCK_N)
        w = tl.load(w_cols + offs_n[:, None] * stride_wn, mask=mask_nk, other=0.0)
        dz = _grad_preact(dy, v, negative_slope, MODE, ACT).to(w.dtype)
        acc = tl.dot(dz, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(dx_ptr + tl.program_id(1).to(tl.int64) * stride_dxs + offs_m[:, None] * stride_dxm
             + offs_k[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@_autotune("dw")
@triton.heuristics({"BYTE_ROWS": _byte_rows})
@_ALIGN
@triton.jit
def _linear_act_backward_dw_kernel(
    dy_ptr, v_ptr, x_ptr, dw_ptr, db_ptr,
    M, N, K, rows_per_split,
    stride_dym, stride_dyn, stride_vm, stride_vn, stride_xm, stride_xk,
    stride_dws, stride_dwn, stride_dwk, stride_dbs, stride_db,
    negative_slope: tl.float64,
    ACT: tl.constexpr, MODE: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BYTE_ROWS: tl.constexpr, ALIGN_K: tl.constexpr,
    ALIGN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dW[BLOCK_N, BLOCK_K] = sum_m dZ[m, :]^T x[m, :] and db[BLOCK_N] = sum_m dZ[m, :] over the
    rows [s * rows_per_split, (s + 1) * rows_per_split) of split s = program_id(1), dZ formed in the
    operand load (from y, z or the packed sign mask, as MODE says) or read as is (MODE_RECOMPUTE).
    Split s stores to dw_ptr + s * stride_dws (a partial when there is more than one split, the
    result otherwise); db is stored by pid_k == 0."""
    K, stride_xm = _multiple(K, ALIGN_K), _multiple(stride_xm, ALIGN_K)
    stride_dws, stride_dwn = _multiple(stride_dws, ALIGN_K), _multiple(stride_dwn, ALIGN_K)
    N, stride_dym, stride_vm = _multiple(N, ALIGN_N), _multiple(stride_dym, ALIGN_N), _multiple(stride_vm, ALIGN_N)
    stride_dbs = _multiple(stride_dbs, ALIGN_N)
    if COMPUTE_DW:
        pid_n, pid_k = _grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP)
    else:
        pid_n = tl.program_id(0)
        pid_k = pid_n * 0
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    m_start = pid_s.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    dy_cols = dy_ptr + offs_n[None, :] * stride_dyn
    x_cols = x_ptr + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    db_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < m_end
        mask_mn = mask_m[:, None] & mask_n[None, :]
        dy = tl.load(dy_cols + offs_m[:, None] * stride_dym, mask=mask_mn, other=0.0).to(ACC_DTYPE)
        if MODE == MODE_RECOMPUTE:
            v = dy
        else:
            v = _load_v(v_ptr, offs_m, mask_m, pid_n * BLOCK_N, offs_n, stride_vm, stride_vn, N, mask_mn, MODE,
                        BYTE_ROWS, ACC_DTYPE, BLOCK_M, BLOCK_N)
        dz = _grad_preact(dy, v, negative_slope, MODE, ACT)      # [BLOCK_M, BLOCK_N]
        if COMPUTE_DB:
            db_acc += tl.sum(dz, axis=0)
        if COMPUTE_DW:
            x = tl.load(x_cols + offs_m[:, None] * stride_xm, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(tl.trans(dz.to(x.dtype)), x, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid_s.to(tl.int64) * stride_dws + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
                 acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if COMPUTE_DB:
        tl.store(db_ptr + pid_s.to(tl.int64) * stride_dbs + offs_n * stride_db, db_acc.to(db_ptr.dtype.element_ty),
                 mask=mask_n & (pid_k == 0))


# Narrow layers (N and K at most NARROW_MAX): one backward kernel, one pass over the rows. On a GPU
# only for 16-bit inputs on compute capability NARROW_CAPABILITY (H100, sm_90a), the one target
# these configs were compiled and checked for (wgmma, no spills for the variants that have a config
# in SPILLS' terms: ``narrow_spill_free``); with mma.sync (sm_8x) and with the FMA path of
# fp32-ieee the five live tiles (dY, y or z, x, W, and the dX / dW accumulators) spill, and newer
# targets (sm_100, sm_120) are unchecked, so those take the two-kernel path.
NARROW_MAX = 64
NARROW_CAPABILITY = (9, 0)
# (BLOCK_M, num_warps, num_stages); the full (padded) N and K are the other two tile extents.
NARROW_TILES = [(64, 4, 3), (128, 8, 3)]
NARROW_MAX_BLOCK_M = 128


def _make_narrow_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": INTERPRETER_TILE[0]}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st) for bm, w, st in NARROW_TILES]


def narrow_spill_free(act: int, mode: int, byte_rows: bool = True) -> bool:
    """Whether some narrow config runs this variant without spills (else the two-kernel path)."""
    variant = spill_variant("narrow", dict(ACT=act, MODE=mode, BYTE_ROWS=byte_rows))
    return any(spill_free("narrow", "hopper", tile, variant) for tile in NARROW_TILES)


def _prune_narrow(configs, named_args, **kwargs):
    variant = spill_variant("narrow", dict(kwargs, BYTE_ROWS=_byte_rows(named_args)))
    return [c for c in configs if spill_free("narrow", "hopper", config_tile("narrow", c), variant)] or configs


@lambda fn: Tuner(fn, _make_narrow_configs(), _prune_narrow)
@triton.heuristics({"BYTE_ROWS": _byte_rows})
@_ALIGN
@triton.jit
def _linear_act_backward_narrow_kernel(
    dy_ptr, v_ptr, x_ptr, w_ptr, b_ptr, dx_ptr, dw_ptr, db_ptr,
    M, N, K, rows_per_split,
    stride_dym, stride_dyn, stride_vm, stride_vn, stride_xm, stride_xk, stride_wn, stride_wk, stride_b,
    stride_dxm, stride_dxk, stride_dws, stride_dwn, stride_dwk, stride_dbs, stride_db,
    negative_slope: tl.float64,
    ACT: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BYTE_ROWS: tl.constexpr, ALIGN_K: tl.constexpr,
    ALIGN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The whole backward of a narrow layer (BLOCK_N >= N, BLOCK_K >= K: W and the dW partial stay
    on chip) in one pass over the rows [s * rows_per_split, (s + 1) * rows_per_split) of split
    s = program_id(0): per row block, dZ is formed once, from dY and y, z or the packed sign mask
    (MODE), or from dY and z = x W^T + b recomputed with the x tile already loaded for dW
    (MODE_RECOMPUTE); then dX = dZ W is stored, and dZ^T x and the column sums of dZ accumulate
    into this split's dW and db (partials when there is more than one split, reduced by
    _sum_splits_kernel). Reads dY, y or z (not with MODE_RECOMPUTE), x, W once; writes dX once:
    the bare-GEMM traffic floor."""
    K, stride_xm, stride_wn = _multiple(K, ALIGN_K), _multiple(stride_xm, ALIGN_K), _multiple(stride_wn, ALIGN_K)
    stride_dxm, stride_dws = _multiple(stride_dxm, ALIGN_K), _multiple(stride_dws, ALIGN_K)
    stride_dwn = _multiple(stride_dwn, ALIGN_K)
    N, stride_dym, stride_vm = _multiple(N, ALIGN_N), _multiple(stride_dym, ALIGN_N), _multiple(stride_vm, ALIGN_N)
    stride_dbs = _multiple(stride_dbs, ALIGN_N)
    pid_s = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask_nk = mask_n[:, None] & mask_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    if MODE == MODE_RECOMPUTE and HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(ACC_DTYPE)
    m_start = pid_s.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    dw_acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    db_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < m_end
        mask_mn = mask_m[:, None] & mask_n[None, :]
        mask_mk = mask_m[:, None] & mask_k[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_mn, other=0.0).to(ACC_DTYPE)
        # W is re-read per row block (from L2: it is tiny) so that it is pipelined through shared
        # memory with the other operands instead of pinning registers for the whole loop.
        w = tl.load(w_ptrs, mask=mask_nk, other=0.0)
        if MODE == MODE_RECOMPUTE or COMPUTE_DW:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_mk, other=0.0)
        if MODE == MODE_RECOMPUTE:
            z = tl.dot(x, tl.trans(w), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_BIAS:
                z = z + bias[None, :]
            dz = dy * _activation_grad(z, negative_slope, False, ACT)
        else:
            v = _load_v(v_ptr, offs_m, mask_m, 0, offs_n, stride_vm, stride_vn, N, mask_mn, MODE, BYTE_ROWS,
                        ACC_DTYPE, BLOCK_M, BLOCK_N)
            dz = _grad_preact(dy, v, negative_slope, MODE, ACT)
        if COMPUTE_DB:
            db_acc += tl.sum(dz, axis=0)
        dz_op = dz.to(w.dtype)
        if COMPUTE_DX:
            dx = tl.dot(dz_op, w, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                     dx.to(dx_ptr.dtype.element_ty), mask=mask_mk)
        if COMPUTE_DW:
            dw_acc = tl.dot(tl.trans(dz_op), x, dw_acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid_s.to(tl.int64) * stride_dws + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
                 dw_acc.to(dw_ptr.dtype.element_ty), mask=mask_nk)
    if COMPUTE_DB:
        tl.store(db_ptr + pid_s.to(tl.int64) * stride_dbs + offs_n * stride_db, db_acc.to(db_ptr.dtype.element_ty),
                 mask=mask_n)


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, L, SPLIT, stride_s, BLOCK: tl.constexpr):
    """out[i] = sum_s ws[s, i] for a contiguous (SPLIT, L) fp32 workspace, s in a fixed order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=ws_ptr.dtype.element_ty)
    ptrs = ws_ptr + offs
    for _ in range(0, SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_s                                          # 64-bit pointer arithmetic
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
