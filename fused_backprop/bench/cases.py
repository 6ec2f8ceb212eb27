"""What the benchmark runs: cases, providers, the timed statements and the correctness gate.

A *case* is (device, dtype, activation, M, K, N): x ``(M, K)``, W ``(N, K)``, b ``(N,)``, the
layer's output ``(M, N)``. A *provider* is what gets timed on a case:

* a backend of the package (``cpu``, ``cuda``, ``triton``, ``torch``, ``numpy``), through the public
  ``fused_backprop.linear_act(..., backend=name)`` path, optionally with ``recompute=True``;
* ``eager``: ``act(F.linear(x, W, b))`` in eager PyTorch;
* ``compile``: the same function through ``torch.compile`` (dynamo reset per case);
* ``floor``: the bare GEMMs the layer cannot do without, on preallocated outputs — forward
  ``addmm(b, x, Wᵀ)``; backward ``dZ·W`` and ``dZᵀ·x``; forward+backward ``x·Wᵀ``, ``dZ·W``, ``dZᵀ·x``.

Modes: ``forward`` (inputs don't require grad), ``backward`` (the gradient of a graph built once,
``autograd.grad(out, (x, W, b), g, retain_graph=True)``) and ``forward+backward`` (x, W, b require
grad; forward then ``autograd.grad(out, (x, W, b), g)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fused_backprop as fb
from fused_backprop import backends

MODES = ("forward", "backward", "forward+backward")
MODE_ALIASES = {"fwd": "forward", "forward": "forward", "bwd": "backward", "backward": "backward",
                "fwd+bwd": "forward+backward", "fwdbwd": "forward+backward", "train": "forward+backward",
                "forward+backward": "forward+backward", "full": "forward+backward"}
# GEMM flops of each mode in units of M*K*N (one GEMM = 2 MKN): the layer's arithmetic floor.
MODE_GEMMS = {"forward": 1, "backward": 2, "forward+backward": 3}
ACTIVATIONS = fb.ACTIVATIONS  # every activation; the default run times DEFAULT_ACTIVATIONS
DEFAULT_ACTIVATIONS = ("relu", "sigmoid")
BASELINES = ("eager", "compile", "floor")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "double": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}

# Largest normalized error max|got - want| / max|want| that passes the gate, per dtype. Wide enough
# for TF32 tensor cores (float32 GEMMs on GPUs) and bf16/fp16 rounding of the output; a wrong kernel
# (missing bias, wrong activation or derivative, a dropped tile) is off by O(0.1-1).
TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Case:
    device: str
    dtype: torch.dtype
    activation: str
    M: int
    K: int
    N: int

    @property
    def shape(self) -> str:
        return f"{self.M}x{self.K}x{self.N}"

    def flops(self, mode: str) -> int:
        return 2 * MODE_GEMMS[mode] * self.M * self.K * self.N

    def __str__(self) -> str:
        return f"{self.device} {dtype_name(self.dtype)} {self.activation} {self.shape}"


@dataclass(frozen=True)
class Provider:
    name: str                       # "cpu", "cpu+recompute", "eager", "compile", "floor", ...
    backend: Optional[str] = None   # the package backend, None for a baseline
    recompute: bool = False

    @property
    def is_backend(self) -> bool:
        return self.backend is not None

    def runs_in(self, mode: str) -> bool:
        # recompute changes only what backward does
        return not (self.recompute and mode == "forward")


def backend_provider(name: str, recompute: bool = False) -> Provider:
    return Provider(f"{name}+recompute" if recompute else name, name, recompute)


def make_tensors(case: Case, seed: int = 0):
    """(x, W, b, g): x ~ N(0, 1), W ~ N(0, 1/K) (pre-activations of order 1), b ~ N(0, 1), g ~ N(0, 1),
    drawn in float32 on the CPU (the same numbers on every device), then cast and moved."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=case.device, dtype=case.dtype)

    return (draw(case.M, case.K), draw(case.N, case.K, scale=case.K ** -0.5), draw(case.N),
            draw(case.M, case.N))


def eager_fn(activation: str) -> Callable:
    """``nn.Linear`` + torch's own activation (``F.gelu``, ``F.silu``, ...), default parameters."""
    act = fb.activations.ACTIVATIONS[activation].forward
    slope = fb.activations.DEFAULT_NEGATIVE_SLOPE

    def eager(x, w, b):
        return act(F.linear(x, w, b), slope)

    return eager


def compiled_fn(activation: str) -> Callable:
    """A fresh ``torch.compile`` of the eager layer. Dynamo is reset first: it caches per code object
    and would hit its recompile limit across cases and silently fall back to eager."""
    torch._dynamo.reset()
    return torch.compile(eager_fn(activation), dynamic=False)


def layer_fn(provider: Provider, activation: str, compiled: Optional[Callable]) -> Callable:
    """(x, w, b) -> out for a provider that is a layer (not the floor)."""
    if provider.is_backend:
        name, recompute = provider.backend, provider.recompute

        def fused(x, w, b):
            return fb.linear_act(x, w, b, activation, recompute=recompute, backend=name)

        return fused
    if provider.name == "eager":
        return eager_fn(activation)
    if provider.name == "compile":
        if compiled is None:
            raise ValueError("the compile provider needs the compiled function")
        return compiled
    raise ValueError(f"{provider.name!r} is not a layer provider")


def floor_stmt(mode: str, x, w, b, g) -> Callable[[], object]:
    """The bare GEMMs of the layer, each allocating its result as any layer must (a preallocated
    output would leave out the page faults of a fresh tensor: 10-14 ms of a 58 ms forward at
    8192x1024x1024 on the CPU)."""
    if mode == "forward":
        return lambda: torch.addmm(b, x, w.t())

    def backward_gemms():
        return torch.mm(g, w), torch.mm(g.t(), x)

    if mode == "backward":
        return backward_gemms

    def three_gemms():
        return torch.mm(x, w.t()), backward_gemms()

    return three_gemms


def make_stmt(provider: Provider, mode: str, case: Case, tensors, compiled=None) -> Callable[[], object]:
    """The zero-argument callable that is timed for ``provider`` in ``mode``."""
    x, w, b, g = tensors
    if provider.name == "floor":
        return floor_stmt(mode, x, w, b, g)
    fn = layer_fn(provider, case.activation, compiled)
    if mode == "forward":
        return lambda: fn(x, w, b)
    xs = tuple(t.detach().requires_grad_() for t in (x, w, b))
    if mode == "backward":
        out = fn(*xs)  # the graph, built once and kept
        return lambda: torch.autograd.grad(out, xs, g, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(fn(*xs), xs, g)

    return forward_backward


@dataclass
class Check:
    status: str              # "ok", "wrong" (results off) or "error" (it raised)
    max_err: float           # the largest normalized error over out, dx, dW, db
    worst: str               # which of them it was
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def normalized_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (want in float64); inf on a shape mismatch, NaN counts as inf."""
    if got is None or tuple(got.shape) != tuple(want.shape):
        return float("inf")
    diff = (got.detach().to(torch.float64) - want).abs()
    if want.numel() == 0:
        return 0.0
    if torch.isnan(diff).any():
        # NaN in both places is agreement; NaN in one only is an error
        both = torch.isnan(got.detach().to(torch.float64)) & torch.isnan(want)
        if not torch.equal(torch.isnan(diff), both):
            return float("inf")
        diff = torch.where(both, torch.zeros_like(diff), diff)
    scale = max(want.abs().nan_to_num(0.0).max().item(), torch.finfo(torch.float32).tiny)
    return diff.max().item() / scale


def check_provider(provider: Provider, case: Case, tensors, tol: Optional[float] = None) -> Check:
    """The gate: the provider's forward and its (dx, dW, db) through the public autograd path against
    the ``torch`` backend evaluated in float64 on the same inputs. The expected gradients are formed
    from the provider's own output (act' from y), also with recompute: in bfloat16 a pre-activation
    within rounding of 0 lands on either side of the relu kink, which flips a whole entry of dZ
    without anything being wrong. The output itself is checked on its own."""
    tol = TOLERANCE[case.dtype] if tol is None else tol
    reference = backends.get("torch")
    x, w, b, g = tensors
    x64, w64, b64, g64 = (t.detach().to(torch.float64) for t in tensors)
    try:
        xs = tuple(t.detach().requires_grad_() for t in (x, w, b))
        out = layer_fn(provider, case.activation, None)(*xs)
        grads = torch.autograd.grad(out, xs, g)
    except Exception as exc:  # an unsupported dtype, a failing kernel: reported, not timed
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Check("error", float("nan"), "", f"{type(exc).__name__}: {first_line}")
    slope = fb.activations.DEFAULT_NEGATIVE_SLOPE
    with torch.no_grad():
        want_out = reference.forward(x64, w64, b64, case.activation, slope)
        # act' from the provider's output where it determines it, else from z in float64
        saved = out.detach().to(torch.float64) if fb.activations.saves_output(case.activation, slope) else None
        want = reference.backward(g64, x64, w64, b64, saved, case.activation, (True, True, True), slope)
    errors = {"out": normalized_error(out, want_out)}
    errors.update({name: normalized_error(got, ref) for name, got, ref in zip(("dx", "dW", "db"), grads, want)})
    worst = max(errors, key=lambda k: errors[k])
    ok = errors[worst] <= tol
    message = "" if ok else f"{worst} off by {errors[worst]:.2g} of its largest entry (tolerance {tol:.0e})"
    return Check("ok" if ok else "wrong", errors[worst], worst, message)
