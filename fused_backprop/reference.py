"""NumPy reference for the fused layer ``y = act(x Wᵀ + b)``: the independent test oracle (pure
NumPy, float64, no torch) and a small worked example of backpropagation.

Shapes: x ``(*, K)`` (1-D included), W ``(N, K)``, b ``(N,)`` or None, y ``(*, N)``.
With ``z = x Wᵀ + b`` (the pre-activation) and ``dz = grad_y ⊙ act'(z)`` the chain rule gives::

    dx = dz W        dW = dzᵀ x        db = Σ_rows dz

(leading dims of x are flattened into rows first). ``act'`` comes either from the saved output y
(relu: ``[y > 0]``, sigmoid: ``y (1 - y)``, tanh: ``1 - y²``, leaky relu), or from z: kept
(gelu, gelu_tanh, silu, whose derivative y does not determine) or recomputed from x, W, b.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import numpy as np

__all__ = ["relu", "relu_grad", "sigmoid", "sigmoid_grad", "tanh", "leaky_relu", "leaky_relu_grad", "gelu",
           "gelu_grad", "gelu_tanh", "gelu_tanh_grad", "silu", "silu_grad", "identity", "ACTIVATIONS",
           "forward", "backward", "NumpyMLP", "numerical_gradient", "gradient_check"]

# Beyond this |z|, exp(-|z|) would underflow (exp(-708) is the last normal double); use 0.
_EXP_CUTOFF = 700.0


def relu(z):
    """relu(z) = max(z, 0); NaN stays NaN."""
    return np.maximum(z, 0.0)


def relu_grad(v):
    """relu'(z) = 0 where z <= 0, else 1 (so relu'(0) = 0, and a NaN passes the gradient, as in
    torch). Also right from the output: [y <= 0] = [z <= 0]."""
    return np.logical_not(v <= 0).astype(np.float64)


def _exp_neg_abs(z):
    """exp(-|z|) without underflow: 0 for |z| > 700. NaN stays NaN."""
    a = np.abs(z)
    return np.where(a > _EXP_CUTOFF, 0.0, np.exp(-np.minimum(a, _EXP_CUTOFF)))


def sigmoid(z):
    """σ(z) = 1 / (1 + e^-z), written with e = e^-|z| ≤ 1 so nothing overflows:
    σ(z) = 1 / (1 + e) for z ≥ 0 and e / (1 + e) for z < 0."""
    e = _exp_neg_abs(z)
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def sigmoid_grad(z):
    """σ'(z) = σ(z) (1 - σ(z)) = e / (1 + e)² with e = e^-|z| (σ' is even)."""
    e = _exp_neg_abs(z)
    return e / (1.0 + e) ** 2


def identity(z):
    """The identity, for a last layer without activation (logits)."""
    return z


def tanh(z):
    """tanh(z) (NumPy's; ±1 at ±inf)."""
    return np.tanh(z)


def leaky_relu(z, negative_slope=0.01):
    """z for z > 0, else negative_slope · z (NaN stays NaN)."""
    return np.where(z > 0, z, z * negative_slope)


def leaky_relu_grad(v, negative_slope=0.01):
    """1 for z > 0, else negative_slope (also at 0 and at NaN, as torch); from y too when the slope is >= 0."""
    return np.where(v > 0, 1.0, negative_slope)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _normal_pdf(z):
    with np.errstate(over="ignore"):  # z² = inf for |z| > 1e154: e^-inf = 0
        return np.exp(-0.5 * (z * z)) / math.sqrt(2 * math.pi)


def gelu(z):
    """z Φ(z), Φ the standard normal CDF = (1 + erf(z / √2)) / 2."""
    return z * 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def gelu_grad(z):
    """Φ(z) + z φ(z), φ the standard normal density."""
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * _normal_pdf(z)


_GELU_C, _GELU_K = math.sqrt(2.0 / math.pi), 0.044715


def gelu_tanh(z):
    """z (1 + tanh(c (z + k z³))) / 2 with c = √(2/π), k = 0.044715."""
    return 0.5 * z * (1.0 + np.tanh(_GELU_C * (z + _GELU_K * z ** 3)))


def gelu_tanh_grad(z):
    """d/dz of gelu_tanh: (1 + t)/2 + z (1 - t²) c (1 + 3k z²) / 2 with t = tanh(c (z + k z³))."""
    t = np.tanh(_GELU_C * (z + _GELU_K * z ** 3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t ** 2) * _GELU_C * (1.0 + 3.0 * _GELU_K * z ** 2)


def silu(z):
    """z σ(z)."""
    return z * sigmoid(z)


def silu_grad(z):
    """σ(z) + z σ'(z)."""
    return sigmoid(z) + z * sigmoid_grad(z)


class Activation(NamedTuple):
    forward: Callable           # (z, negative_slope)
    grad_from_preact: Callable  # act'(z)
    grad_from_output: Optional[Callable]  # act'(z) written with y = act(z); None if y does not determine it


def _plain(f):
    return lambda v, a: f(v)


ACTIVATIONS = {
    "relu": Activation(_plain(relu), _plain(relu_grad), _plain(relu_grad)),
    "sigmoid": Activation(_plain(sigmoid), _plain(sigmoid_grad), _plain(lambda y: y * (1.0 - y))),
    "tanh": Activation(_plain(tanh), _plain(lambda z: 1.0 - np.tanh(z) ** 2), _plain(lambda y: 1.0 - y * y)),
    "leaky_relu": Activation(leaky_relu, leaky_relu_grad, leaky_relu_grad),
    "gelu": Activation(_plain(gelu), _plain(gelu_grad), None),
    "gelu_tanh": Activation(_plain(gelu_tanh), _plain(gelu_tanh_grad), None),
    "silu": Activation(_plain(silu), _plain(silu_grad), None),
    "identity": Activation(_plain(identity), _plain(np.ones_like), _plain(np.ones_like)),
}


def _activation(activation: str) -> Activation:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _as_float64(name: str, a):
    """``a`` as a float64 ndarray; accepts torch-like tensors (``.detach()``) without importing torch."""
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    return a


def _param_args(W, b):
    """W, b as float64 arrays, with shapes checked: W (N, K), b (N,) or None."""
    W, b = _as_float64("W", W), _as_float64("b", b)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (N, K), got shape {W.shape}")
    if b is not None and b.shape != (W.shape[0],):
        raise ValueError(f"b must have shape ({W.shape[0]},) to match W {W.shape}, got {b.shape}")
    return W, b


def _layer_args(x, W, b):
    """x, W, b as float64 arrays, with shapes checked: x (*, K), W (N, K), b (N,) or None."""
    W, b = _param_args(W, b)
    x = _as_float64("x", x)
    if x.shape[-1] != W.shape[1]:
        raise ValueError(f"x must have shape (*, K={W.shape[1]}) to match W {W.shape}, got {x.shape}")
    return x, W, b


def _preactivation(x, W, b):
    z = x @ W.T
    return z if b is None else z + b


def forward(x, W, b=None, activation: str = "relu", negative_slope: float = 0.01):
    """y = act(x Wᵀ + b) for x (*, K), W (N, K), b (N,) or None; y has shape (*, N)."""
    act = _activation(activation)
    x, W, b = _layer_args(x, W, b)
    return act.forward(_preactivation(x, W, b), negative_slope)


def backward(grad_y, x, W, b=None, y=None, activation: str = "relu", negative_slope: float = 0.01, z=None):
    """(dx, dW, db) of y = act(x Wᵀ + b) given grad_y = ∂L/∂y:

    dz = grad_y ⊙ act'(z),  dx = dz W,  dW = dzᵀ x,  db = Σ_rows dz  (None when b is None).

    act' is taken from the pre-activation ``z`` when given, else from the output ``y`` when given
    (only for activations whose derivative it determines), else from z = x Wᵀ + b recomputed.
    Leading dims of x are flattened into rows; dx gets x's shape back."""
    act = _activation(activation)
    x, W, b = _layer_args(x, W, b)
    n, k = W.shape
    out_shape = x.shape[:-1] + (n,)
    grad_y = _as_float64("grad_y", grad_y)
    if grad_y.shape != out_shape:
        raise ValueError(f"grad_y must have the output's shape {out_shape}, got {grad_y.shape}")
    rows = int(np.prod(x.shape[:-1]))
    x2, g2 = x.reshape(rows, k), grad_y.reshape(rows, n)

    def saved(name, v):
        v = _as_float64(name, v)
        if v.shape != out_shape:
            raise ValueError(f"{name} must have the output's shape {out_shape}, got {v.shape}")
        return v.reshape(rows, n)

    if z is not None:
        dz = g2 * act.grad_from_preact(saved("z", z), negative_slope)
    elif y is not None:
        if act.grad_from_output is None or (activation == "leaky_relu" and negative_slope < 0):
            raise ValueError(f"y does not determine the derivative of {activation!r}: pass z or neither")
        dz = g2 * act.grad_from_output(saved("y", y), negative_slope)
    else:
        dz = g2 * act.grad_from_preact(_preactivation(x2, W, b), negative_slope)
    dx = (dz @ W).reshape(x.shape)
    dW = dz.T @ x2  # (N, 0) @ (0, K) is zeros when there are no rows
    db = None if b is None else dz.sum(axis=0)
    return dx, dW, db


class NumpyMLP:
    """A stack of layers sizes[0] -> ... -> sizes[-1], each y = act(x Wᵀ + b), with backprop by hand.

    ``last_activation=False`` leaves the last layer linear (logits). Parameters are drawn as in
    ``nn.Linear`` (uniform in ±1/sqrt(fan_in)) from ``np.random.default_rng(seed)``; load given
    ones (e.g. a torch model's) with ``NumpyMLP.from_params``."""

    def __init__(self, sizes, activation: str = "relu", last_activation: bool = True, seed: int = 0):
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least 2 widths (input and output), got {sizes}")
        rng = np.random.default_rng(seed)
        params = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / np.sqrt(n_in) if n_in > 0 else 0.0
            params.append((rng.uniform(-bound, bound, (n_out, n_in)), rng.uniform(-bound, bound, n_out)))
        self._setup(params, activation, last_activation)

    @classmethod
    def from_params(cls, params, activation: str = "relu", last_activation: bool = True) -> "NumpyMLP":
        """An MLP with the given [(W, b), ...] (arrays or torch tensors, copied to float64; b may be None)."""
        mlp = cls.__new__(cls)
        mlp._setup([tuple(None if p is None else p.copy() for p in _param_args(W, b)) for W, b in params],
                   activation, last_activation)
        return mlp

    def _setup(self, params, activation: str, last_activation: bool) -> None:
        _activation(activation)
        if not params:
            raise ValueError("params must list at least one (W, b) pair")
        self.params = params
        self.activations = [activation] * len(params)
        if not last_activation:
            self.activations[-1] = "identity"
        self.cache = []  # per layer (input, output) of the last forward

    def forward(self, x):
        """Runs the layers in turn, keeping each layer's (input, output) in ``self.cache`` for backward."""
        x = _as_float64("x", x)
        self.cache = []
        for (W, b), activation in zip(self.params, self.activations):
            y = forward(x, W, b, activation)
            self.cache.append((x, y))
            x = y
        return x

    def backward(self, grad_out):
        """Backprop of the last ``forward``: walks the layers last to first, each turning ∂L/∂y into
        ∂L/∂x (the previous layer's ∂L/∂y) and its (dW, db). Returns (dx, [(dW, db) per layer])."""
        if len(self.cache) != len(self.params):
            raise RuntimeError("NumpyMLP.backward needs a forward call first")
        grads = []
        grad = _as_float64("grad_out", grad_out)
        for (W, b), activation, (x, y) in reversed(list(zip(self.params, self.activations, self.cache))):
            y_kept = y if ACTIVATIONS[activation].grad_from_output is not None else None  # else recompute z
            grad, dW, db = backward(grad, x, W, b, y_kept, activation)
            grads.append((dW, db))
        return grad, grads[::-1]


def numerical_gradient(f, x, eps: float = 1e-6):
    """∂f/∂x by central differences: (f(x + eps e_i) - f(x - eps e_i)) / (2 eps) for each element i.

    ``f`` maps the float64 array ``x`` (changed in place, restored after each element) to a scalar."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        raise TypeError(f"x must be a float64 numpy array (it is perturbed in place), "
                        f"got {type(x).__name__} of dtype {getattr(x, 'dtype', None)}")
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        original = x[i]
        x[i] = original + eps
        f_plus = float(f(x))
        x[i] = original - eps
        f_minus = float(f(x))
        x[i] = original
        grad[i] = (f_plus - f_minus) / (2 * eps)
    return grad


def gradient_check(f, x, analytic_grad, eps: float = 1e-6, tiny: float = 1e-8) -> float:
    """Largest relative error between ``analytic_grad`` (a) and ``numerical_gradient(f, x, eps)`` (n):

        max_i |a_i - n_i| / max(|a_i| + |n_i|, tiny)

    0 is perfect, ~1 means unrelated; a right float64 gradient of a smooth f gives ≲ 1e-7.
    ``tiny`` keeps entries where both are ~0 from dividing by 0 (they count as absolute errors / tiny)."""
    a = _as_float64("analytic_grad", analytic_grad)
    if a.shape != np.shape(x):
        raise ValueError(f"analytic_grad must have x's shape {np.shape(x)}, got {a.shape}")
    n = numerical_gradient(f, x, eps)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), tiny)))
