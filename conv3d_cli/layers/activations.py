"""The 31 Keras 3 activations in NumPy, plus tf.keras 2's ``hard_sigmoid``.

Each activation works on an array in the engine's channels-last layout and is
told which axis is Keras's axis -1 (the channel axis under ``channels_last``,
W under ``channels_first``), because ``softmax``, ``log_softmax``, ``glu`` and
``sparsemax`` act along it. Formulas follow ``keras/src/activations`` and
``keras/src/backend/numpy/nn.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np

from ..errors import ArgumentError

# scipy.special (expit, erf, erfc) is imported where it is used: loading it costs
# more than the rest of the package, and most layers never call it.

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    if x.dtype.itemsize < 4:
        # XLA on CPU sums float16 / bfloat16 in float32 and rounds the sum; it
        # divides float16 as a product with the rounded reciprocal, bfloat16
        # (carried in float32) with one rounding.
        total = np.sum(e, axis=axis, keepdims=True, dtype=np.float32).astype(x.dtype)
        if x.dtype == np.float16:
            return e * (np.ones((), x.dtype) / total)
        return (e.astype(np.float32) / total.astype(np.float32)).astype(x.dtype)
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax(x, axis):
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _sigmoid(x):
    if x.dtype.itemsize < 4:
        # float16 / bfloat16: XLA's formula for the logistic, 1 / (1 + exp(-x)),
        # rounded after each operation (expit rounded once differs by an ulp
        # in a third of the values).
        one = np.ones((), x.dtype)
        with np.errstate(over="ignore"):
            return one / (one + np.exp(-x))
    from scipy import special
    return special.expit(x)


def _gelu(x, approximate=False):
    from scipy import special
    if approximate:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if x.dtype.itemsize < 4:  # float16 / bfloat16: jax.nn.gelu's formula, rounded per operation
        return (np.asarray(0.5, x.dtype) * x) * \
            special.erfc(-x * np.asarray(math.sqrt(0.5), x.dtype)).astype(x.dtype)
    return 0.5 * x * (1 + special.erf(x / math.sqrt(2)))


def _glu(x, axis):
    if x.shape[axis] % 2:
        raise ArgumentError(
            "axis size must be divisible by 2. Received: "
            f"x.shape={x.shape} with axis={axis}")
    a, b = np.split(x, 2, axis=axis)
    return a * _sigmoid(b)


def _sparsemax(x, axis):
    # Keras 3's own formula (keras/src/backend/*/nn.py), kept as is: its tau sums
    # the cumulative sums over the support, which is not Martins & Astudillo's
    # tau (the cumulative sum at k), so outputs need not sum to one. The tool
    # computes what Keras computes.
    z = -np.sort(-x, axis=axis)
    cssv = np.cumsum(z, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    r = np.arange(1, x.shape[axis] + 1, dtype=x.dtype).reshape(shape)
    support = z - (cssv - 1) / r > 0
    k = np.sum(support, axis=axis, keepdims=True).astype(x.dtype)
    tau = (np.sum(np.where(support, cssv, 0), axis=axis, keepdims=True) - 1) / k
    return np.maximum(x - tau, 0)


def _elu(x, alpha=1.0):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


def _relu(x, negative_slope=0.0, max_value=None, threshold=0.0):
    # Keras's ReLU.static_call, step by step.
    if negative_slope != 0.0:
        if max_value is None and threshold == 0:
            return np.maximum(x, negative_slope * x)
        negative_part = np.maximum(-x + threshold, 0)
    if threshold != 0:
        out = np.where(x > threshold, x, 0)
    else:
        out = np.maximum(x, 0)
    if max_value is not None:
        out = np.clip(out, 0, max_value)
    if negative_slope != 0.0:
        out = out - negative_slope * negative_part
    return out


def _hard_sigmoid(x):
    return np.clip(x + 3.0, 0, 6.0) / 6.0


def _softplus(x):
    return np.logaddexp(np.zeros((), x.dtype), x)


_ELEMENTWISE = {
    "celu": lambda x, alpha=1.0: np.maximum(x, 0) + np.minimum(
        0, alpha * np.expm1(np.minimum(x, 0) / alpha)),
    "elu": _elu,
    "exponential": np.exp,
    "gelu": _gelu,
    "hard_shrink": lambda x, threshold=0.5: np.where(np.abs(x) > threshold, x, 0),
    "hard_sigmoid": _hard_sigmoid,
    "hard_silu": lambda x: x * _hard_sigmoid(x),
    "hard_tanh": lambda x: np.clip(x, -1, 1),
    "leaky_relu": lambda x, negative_slope=0.2: np.maximum(x, negative_slope * x),
    "linear": lambda x: x,
    "log_sigmoid": lambda x: -_softplus(-x),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "relu": _relu,
    "relu6": lambda x: np.clip(x, 0, 6),
    "selu": lambda x: _SELU_SCALE * _elu(x, _SELU_ALPHA),
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "soft_shrink": lambda x, threshold=0.5: np.where(
        x > threshold, x - threshold, np.where(x < -threshold, x + threshold, 0)),
    "softplus": _softplus,
    "softsign": lambda x: x / (1 + np.abs(x)),
    "sparse_plus": lambda x: np.where(x <= -1, 0, np.where(x >= 1, x, (x + 1) ** 2 / 4)),
    "sparse_sigmoid": lambda x: np.where(x <= -1, 0, np.where(x >= 1, 1, (x + 1) / 2)),
    "squareplus": lambda x, b=4: (x + np.sqrt(x * x + b)) / 2,
    "tanh": np.tanh,
    "tanh_shrink": lambda x: x - np.tanh(x),
    "threshold": lambda x, threshold, default_value: np.where(x > threshold, x, default_value),
}
_AXISWISE = {
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "glu": _glu,
    "sparsemax": _sparsemax,
}
_ALIASES = {"swish": "silu", "hard_swish": "hard_silu", None: "linear"}

# tf.keras 2 defines hard_sigmoid differently (docs/semantics.md).
_KERAS2 = {"hard_sigmoid": lambda x: np.clip(0.2 * x + 0.5, 0, 1)}

NAMES = sorted(set(_ELEMENTWISE) | set(_AXISWISE) | {"swish", "hard_swish"})


def _json_object(text, shown):
    try:
        value = json.loads(text)
    except RecursionError:
        raise ArgumentError(f"Invalid JSON in `activation`: nested too deeply in "
                            f"{shown[:80]!r}") from None
    except json.JSONDecodeError as exc:
        raise ArgumentError(f"Invalid JSON in `activation`: {exc.msg} in {shown!r}") from None
    if not isinstance(value, dict):
        raise ArgumentError(f"Invalid `activation`: expected a JSON object, got {shown!r}")
    return value


def _from_serialized(config):
    """(name, arguments) of a serialized activation. Keras 3 serializes a function
    as ``{"module": ..., "class_name": "function", "config": "relu",
    "registered_name": "function"}``; this module serializes an activation with
    arguments as ``{"class_name": "relu", "config": {...}}``."""
    name, args = config.get("class_name"), config.get("config")
    if name == "function":
        if isinstance(args, dict):  # some versions nest the name
            args = args.get("name")
        return args, {}
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ArgumentError(f"Invalid `activation`: its \"config\" must be a JSON object of "
                            f"arguments. Received: {config}")
    return name, args


def _builtin(name, keras2=False):
    """The function of the built-in activation ``name`` (None if there is none)."""
    if keras2 and name in _KERAS2:
        return _KERAS2[name]
    return _AXISWISE.get(name) or _ELEMENTWISE.get(name)


class Activation:
    """A named activation with fixed arguments."""

    def __init__(self, name: str, kwargs: dict | None = None, keras2: bool = False,
                 fn=None):
        self.name = name
        self.kwargs = dict(kwargs or {})
        self.keras2 = keras2
        self.axiswise = name in _AXISWISE
        self._fn = fn if fn is not None else _builtin(name, keras2)
        if self._fn is None:
            raise KeyError(name)

    @property
    def is_linear(self) -> bool:
        return self.name == "linear"

    @property
    def halves_last_axis(self) -> bool:
        """glu halves Keras's axis -1 (filters under channels_last, W otherwise)."""
        return self.name == "glu"

    def __call__(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        if self.is_linear:
            return x
        # NaN and +-Inf go through the formulas as through Keras's (relu(NaN) is
        # NaN, a softmax row holding +Inf is NaN from Inf - Inf, exp overflows to
        # Inf), silently as in Keras: the fixtures pin every case.
        with np.errstate(all="ignore"):
            if self.axiswise:
                out = self._fn(x, axis, **self.kwargs)
            else:
                out = self._fn(x, **self.kwargs)
        return np.asarray(out, dtype=x.dtype)

    def __getstate__(self):
        # A built-in activation is found again by name: the tables hold lambdas,
        # which pickle (worker processes that are not forked) cannot send.
        state = dict(self.__dict__)
        if state["_fn"] is _builtin(self.name, self.keras2):
            state["_fn"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._fn is None:
            self._fn = _builtin(self.name, self.keras2)

    def serialize(self):
        if self.kwargs:
            return {"class_name": self.name, "config": dict(self.kwargs)}
        return self.name

    def __repr__(self):
        return f"Activation({self.name!r})"


def get(identifier, keras2: bool = False) -> Activation:
    """An :class:`Activation` from a name, ``NAME:{json}``, a dict or JSON object
    (Keras-serialized: ``{"class_name": "function", "config": "relu", ...}`` as
    Keras 3 writes a function, or ``{"class_name": "relu", "config": {...}}``),
    or a callable."""
    if isinstance(identifier, Activation):
        return identifier
    if identifier is None:
        return Activation("linear")
    if callable(identifier):
        return Activation(getattr(identifier, "__name__", "custom"), fn=identifier)
    kwargs = {}
    name = identifier
    if isinstance(identifier, str) and identifier.strip().startswith("{"):
        identifier = _json_object(identifier.strip(), identifier)
    if isinstance(identifier, dict):
        name, kwargs = _from_serialized(identifier)
    elif isinstance(identifier, str) and ":" in identifier:
        name, _, args = identifier.partition(":")
        kwargs = _json_object(args, args)
    if not isinstance(name, str):
        raise ArgumentError(f"Could not interpret activation function identifier: {identifier!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _ELEMENTWISE and key not in _AXISWISE:
        raise ArgumentError(
            f"Could not interpret activation function identifier: {name!r}. "
            f"Expected one of: {', '.join(NAMES)}.")
    if key == "threshold" and not {"threshold", "default_value"} <= set(kwargs):
        raise ArgumentError(
            "The `threshold` activation needs arguments, e.g. "
            "'threshold:{\"threshold\": 0.5, \"default_value\": 0}'.")
    act = Activation(key, kwargs, keras2=keras2)
    if kwargs:  # validate the arguments once on a tiny array
        try:
            act(np.zeros((1, 2), np.float32), -1)
        except (TypeError, ValueError) as exc:
            raise ArgumentError(
                f"Invalid arguments for activation {key!r}: {kwargs}. {exc}") from None
    return act
