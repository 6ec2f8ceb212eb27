"""How the Triton backend launches its kernels, as pure functions (no GPU needed): the alignment
the kernels are told about (K or N not a multiple of 16), the autotuner's cache key (M bucketed;
every constexpr that changes the compiled kernel), no tuning during CUDA-graph capture, the
program counts of each launch against the SM counts of A100 and H100, and where the single-pass
narrow backward runs. The autotuner itself runs here under the interpreter on a small kernel."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_backprop import backends  # noqa: E402

if backends.get("triton") is None:
    pytest.skip("the triton backend failed to import", allow_module_level=True)

from fused_backprop.triton import kernels as K  # noqa: E402
from fused_backprop.triton import ops  # noqa: E402

DEVICE = "cpu" if K.INTERPRET else "cuda"
SMS = sorted(K.SM_COUNTS.values())
SMEM = {"ampere": 163 * 1024, "hopper": 227 * 1024, "fma": 163 * 1024}


# ------------------------------------------------------------------------------------------------
# Alignment (issue 16, item 2).
# ------------------------------------------------------------------------------------------------

def test_alignment_is_the_power_of_two_dividing_the_extent_and_its_row_strides():
    contiguous = dict(K=1000, N=4096, stride_xm=1000, stride_wn=1000, stride_om=4096, stride_pm=4096, stride_xk=1)
    assert K.alignment(contiguous, "K") == 8 and K.alignment(contiguous, "N") == 16
    assert K.alignment(dict(contiguous, K=999, stride_xm=999, stride_wn=999), "K") == 1
    assert K.alignment(dict(contiguous, stride_xm=1004), "K") == 4        # a padded x: its stride decides
    assert K.alignment(dict(contiguous, K=4096, stride_xm=4096, stride_wn=4096), "K") == 16
    assert K.alignment(dict(N=40, stride_dym=40, stride_vm=0), "N") == 8  # a sign mask passes stride 0
    assert not set(K.ROW_STRIDES["K"]) & set(K.ROW_STRIDES["N"])


def test_every_kernel_takes_the_alignment():
    for kernel in (K._linear_act_forward_kernel, K._linear_act_backward_dz_kernel, K._linear_act_backward_dx_kernel,
                   K._linear_act_backward_dw_kernel, K._linear_act_backward_narrow_kernel):
        assert {"ALIGN_K", "ALIGN_N"} <= kernel.constexprs, kernel.base_fn.__name__


# ------------------------------------------------------------------------------------------------
# The autotuner's key (items 3 and 4).
# ------------------------------------------------------------------------------------------------

def test_m_bucket():
    assert [K.m_bucket(m) for m in (1, 2, 3, 17, 100, 128, 129, 1000, 4096)] == [1, 2, 4, 32, 128, 128, 256, 1024,
                                                                                  4096]
    assert K.m_bucket(K.M_BUCKET_CAP + 1) == K.m_bucket(10 ** 7) == K.M_BUCKET_CAP
    # a sweep over every batch size up to 16k tunes a handful of times, not 16k times
    assert len({K.m_bucket(m) for m in range(1, 16385)}) == K.M_BUCKET_CAP.bit_length()


def _dw_args(**over):
    """Named arguments of a dW launch of the backend (M=1000, N=512, K=1024, bf16-like strides)."""
    x = torch.empty((1000, 1024))
    args = dict(dy_ptr=x, v_ptr=x, x_ptr=x, dw_ptr=x, db_ptr=x, M=1000, N=512, K=1024, rows_per_split=1024,
                stride_dym=512, stride_dyn=1, stride_vm=512, stride_vn=1, stride_xm=1024, stride_xk=1,
                stride_dws=0, stride_dwn=1024, stride_dwk=1, stride_dbs=0, stride_db=1, negative_slope=0.01,
                ACT=0, MODE=K.MODE_OUTPUT.value, COMPUTE_DW=True, COMPUTE_DB=True, ACC_DTYPE=tl.float32,
                INPUT_PRECISION="tf32")
    return {**args, **over}


def test_tune_key_has_every_constexpr_and_buckets_m():
    kernel = K._linear_act_backward_dw_kernel
    key = lambda **over: K.tune_key(_dw_args(**over), kernel.constexprs)  # noqa: E731
    base = key()
    # what changes the compiled kernel (or the config that is fastest) changes the key ...
    for over in (dict(INPUT_PRECISION="ieee"), dict(COMPUTE_DW=False), dict(COMPUTE_DB=False), dict(ACT=4),
                 dict(MODE=K.MODE_PREACT.value), dict(ACC_DTYPE=tl.float64), dict(N=520), dict(K=1000),
                 dict(M=1025), dict(stride_xm=1000), dict(x_ptr=torch.empty((4, 4), dtype=torch.float16)),
                 dict(x_ptr=torch.empty(1000 * 1024 + 1)[1:])):   # a tensor off 16-byte alignment
        assert key(**over) != base, over
    # ... and nothing else does: M within its bucket, leaky relu's slope, a same-class stride
    for over in (dict(M=513), dict(M=1024), dict(negative_slope=0.2), dict(stride_dym=1024),
                 dict(x_ptr=torch.empty((7, 16)))):
        assert key(**over) == base, over
    # every constexpr the backend passes is a constexpr of the kernel (so it is in the key)
    for kernel, passed in ((K._linear_act_forward_kernel, {"ACT", "HAS_BIAS", "STORE_PREACT", "ACC_DTYPE",
                                                             "INPUT_PRECISION"}),
                           (K._linear_act_backward_dw_kernel, {"ACT", "MODE", "COMPUTE_DW", "COMPUTE_DB", "ACC_DTYPE",
                                                                "INPUT_PRECISION"}),
                           (K._linear_act_backward_narrow_kernel, {"COMPUTE_DX", "COMPUTE_DW", "COMPUTE_DB",
                                                                    "HAS_BIAS", "BLOCK_N", "BLOCK_K"})):
        assert passed <= kernel.constexprs


@triton.jit
def _scale_kernel(x_ptr, y_ptr, M, stride, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    tl.store(y_ptr + offs, tl.load(x_ptr + offs * stride, mask=mask) * SCALE, mask=mask)


class _Bench:
    """A do_bench that runs the launch once and times config BLOCK=16 slower than BLOCK=32."""

    def __init__(self):
        self.calls = 0

    def __call__(self, kernel_call, quantiles):
        self.calls += 1
        kernel_call()
        return [float(self.calls % 2 + 1)] * 3


def _tuner():
    configs = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1)]
    tuner = K.Tuner(_scale_kernel, configs, lambda configs, named_args, **kw: configs)
    tuner._do_bench = bench = _Bench()
    return tuner, bench


def _launch(tuner, m, scale=2.0, stride=1):
    x = torch.arange(m * stride, dtype=torch.float32, device=DEVICE)
    y = torch.empty(m, device=DEVICE)
    tuner[lambda meta: (triton.cdiv(m, meta["BLOCK"]),)](x, y, m, stride, SCALE=scale)
    torch.testing.assert_close(y, x[::stride] * scale)


def test_tuner_times_once_per_m_bucket_and_constexpr():
    tuner, bench = _tuner()
    _launch(tuner, 100)
    assert bench.calls == 2 and len(tuner.cache) == 1
    _launch(tuner, 120)                      # same bucket (128): no timing, the cached config
    _launch(tuner, 128)
    assert bench.calls == 2
    _launch(tuner, 200)                      # bucket 256
    assert bench.calls == 4
    _launch(tuner, 100, scale=3.0)           # another constexpr: another compiled kernel, tuned anew
    assert bench.calls == 6
    _launch(tuner, 100, stride=3)            # another specialisation of the stride
    assert bench.calls == 8 and len(tuner.cache) == 4


def test_tuner_does_not_time_during_graph_capture(monkeypatch):
    tuner, bench = _tuner()
    _launch(tuner, 100)
    monkeypatch.setattr(K, "_capturing", lambda: True)
    _launch(tuner, 120)                      # cached: the tuned config
    _launch(tuner, 1000)                     # not cached: the first pruned config, untimed and not cached
    assert bench.calls == 2 and len(tuner.cache) == 1 and tuner.best_config is tuner.configs[0]
    monkeypatch.setattr(K, "_capturing", lambda: False)
    _launch(tuner, 1000)
    assert bench.calls == 4 and len(tuner.cache) == 2


def test_capturing_reads_the_current_stream():
    assert K._capturing() is False            # no capture here (and no GPU in CI)


# ------------------------------------------------------------------------------------------------
# Under-filled grids (item 5): program counts against the SM counts of A100 and H100.
# ------------------------------------------------------------------------------------------------

def test_programs():
    shape = dict(M=64, N=50000, K=4096)
    assert K.programs("fwd", shape, (128, 128, 64)) == 1 * 391
    assert K.programs("dx", shape, (128, 128, 32)) == 32          # the dX: 32 programs ...
    assert K.programs("dx", shape, (128, 128, 32), splits=5) == 160
    assert K.programs("dw", shape, (128, 256, 32)) == 391 * 16
    assert K.programs("dw", shape, (128, 256, 32), splits=3, compute_dw=False) == 391 * 3


def _kept(role, family, shape, sms, variant, splits=1, itemsize=2):
    return K.prune_tiles(role, family, shape, itemsize, variant, sms, SMEM[family], splits)


@pytest.mark.parametrize("sms", SMS, ids=lambda s: f"{s}SMs")
@pytest.mark.parametrize("family", ["ampere", "hopper"])
def test_dx_of_a_short_wide_layer_fills_the_gpu(family, sms):
    """dX at M=64, K=4096, N=50k: 32-64 output tiles; split over N it fills every SM."""
    M, N, K_ = 64, 50000, 4096
    shape = dict(M=M, N=N, K=K_)
    splits = K.reduction_splits(*ops._split_terms("dx", M, N, K_, 2), sms)
    cols = ops._split_length(N, splits, False)
    splits = triton.cdiv(N, cols)
    assert splits > 1 and cols % K.MAX_BLOCK_RED == 0
    kept = _kept("dx", family, shape, sms, "sigmoid:output", splits)
    assert kept and all(K.programs("dx", shape, t, splits) >= sms for t in kept), kept
    unsplit = K.prune_tiles("dx", family, shape, 2, "sigmoid:output", 1, SMEM[family])
    assert min(K.programs("dx", shape, t) for t in unsplit) < sms  # what the big tiles had without the split


@pytest.mark.parametrize("sms", SMS, ids=lambda s: f"{s}SMs")
@pytest.mark.parametrize("family", ["ampere", "hopper", "fma"])
@pytest.mark.parametrize("role", ["fwd", "dz", "dx", "dw"])
@pytest.mark.parametrize("shape", [(256, 1024, 1024), (64, 4096, 4096), (512, 256, 8192), (4096, 4096, 4096)],
                         ids=lambda s: "M{}N{}K{}".format(*s))
def test_grids_fill_the_gpu_where_a_tile_can(shape, role, family, sms):
    """Every tile the pruning keeps fills the SMs if any spill-free, fitting tile does; otherwise
    the kept tiles are those with the most programs. Where every tile fills, none is dropped."""
    shape = dict(zip("MNK", shape))
    variant = K.spill_variant(role, K.launch_variants(role)[1])
    kept = _kept(role, family, shape, sms, variant, itemsize=4 if family == "fma" else 2)
    unfilled = K.prune_tiles(role, family, shape, 4 if family == "fma" else 2, variant, 1, SMEM[family])
    counts = {t: K.programs(role, shape, t) for t in unfilled}
    assert set(kept) <= set(unfilled)
    if any(c >= sms for c in counts.values()):
        assert all(counts[t] >= sms for t in kept)
        assert set(kept) == {t for t in unfilled if counts[t] >= sms}
    else:
        assert {counts[t] for t in kept} == {max(counts.values())}


def test_reduction_splits():
    assert K.reduction_splits(200, 10 ** 6, 4, 10 ** 9, 132) == 1          # enough tiles already
    assert K.reduction_splits(10, 10 ** 6, 4, 10 ** 9, 132) == 27          # about two programs per SM
    assert K.reduction_splits(10, 3000, 4, 10 ** 9, 132) == 2              # at least 1024 per piece
    assert K.reduction_splits(10, 10 ** 6, 10 ** 6, 3 * 8 * 10 ** 6, 132) == 3  # workspace under 1/8 of reads


# ------------------------------------------------------------------------------------------------
# The narrow single-pass backward (item 7): only on the compute capability it was checked on.
# ------------------------------------------------------------------------------------------------

def test_narrow_kernel_runs_on_sm90_only():
    act, mode = K.ACTIVATION_CODES["sigmoid"], K.MODE_OUTPUT.value
    assert ops.narrow_on_gpu((9, 0), torch.bfloat16, act, mode, True)
    assert ops.narrow_on_gpu((9, 0), torch.float16, act, mode, True)
    for cap in ((8, 0), (8, 9), (10, 0), (12, 0), (9, 1)):
        assert not ops.narrow_on_gpu(cap, torch.bfloat16, act, mode, True), cap
    assert not ops.narrow_on_gpu((9, 0), torch.float32, act, mode, True)
