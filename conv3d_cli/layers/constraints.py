"""Keras weight constraints (``keras/src/constraints``): projections of weights.

Keras applies them after each optimizer update, never in the forward pass, so
a layer computes with its weights as they are. ``Layer.apply_constraints()``
(``--apply-constraints``) projects weights that came from elsewhere.
"""

from __future__ import annotations

import codecs
import marshal
import types

import numpy as np

from ..errors import ArgumentError
from .registry import Registry

_EPSILON = 1e-7  # keras.backend.epsilon()


def _norms(w, axis):
    return np.sqrt(np.sum(np.square(w), axis=axis, keepdims=True))


class Constraint:
    def __call__(self, w):
        return w

    def get_config(self):
        return {}


class MaxNorm(Constraint):
    def __init__(self, max_value=2, axis=0):
        self.max_value, self.axis = max_value, axis

    def __call__(self, w):
        norms = _norms(w, self.axis)
        return w * (np.clip(norms, 0, self.max_value) / (_EPSILON + norms))

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(Constraint):
    def __init__(self, min_value=0.0, max_value=1.0, rate=1.0, axis=0):
        self.min_value, self.max_value, self.rate, self.axis = min_value, max_value, rate, axis

    def __call__(self, w):
        norms = _norms(w, self.axis)
        clipped = np.clip(norms, self.min_value, self.max_value)
        desired = self.rate * clipped + (1 - self.rate) * norms
        return w * (desired / (_EPSILON + norms))

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value,
                "rate": self.rate, "axis": self.axis}


class NonNeg(Constraint):
    def __call__(self, w):
        return np.maximum(w, 0)


class UnitNorm(Constraint):
    def __init__(self, axis=0):
        self.axis = axis

    def __call__(self, w):
        return w / (_EPSILON + _norms(w, self.axis))

    def get_config(self):
        return {"axis": self.axis}


_BUILTIN = (MaxNorm, MinMaxNorm, NonNeg, UnitNorm)
REGISTRY = Registry("constraint", "keras.constraints", Constraint)
for _cls in _BUILTIN:
    REGISTRY.register(_cls)
REGISTRY.register(MaxNorm, "maxnorm", "max_norm")
REGISTRY.register(NonNeg, "nonneg", "non_neg")
REGISTRY.register(UnitNorm, "unitnorm", "unit_norm")
REGISTRY.register(MinMaxNorm, "min_max_norm")


def get(identifier, argument="kernel_constraint"):
    """A constraint from a Keras identifier, or a Python callable kept as is
    (Keras 3 keeps any callable; a class is instantiated)."""
    if isinstance(identifier, type) and callable(identifier):
        return identifier()
    if callable(identifier) and not isinstance(identifier, Constraint):
        return identifier
    if isinstance(identifier, dict) and identifier.get("class_name") in ("function", "__lambda__"):
        what = identifier.get("config") if identifier["class_name"] == "function" else "a lambda"
        raise ArgumentError(
            f"`{argument}` was a Python function when the config was saved ({what}); "
            "a config cannot carry its code. Pass the function itself in Python.")
    return REGISTRY.get(identifier, argument)


def serialize(obj):
    """Keras 3's serialized form: a registered constraint by class and config; a
    Python function by name, a lambda by its marshalled code, as Keras's
    ``serialize_keras_object`` writes them."""
    if obj is None or type(obj) in _BUILTIN:
        return REGISTRY.serialize(obj)
    if isinstance(obj, types.FunctionType):
        if obj.__name__ == "<lambda>":
            return {"class_name": "__lambda__", "config": {"value": _func_dump(obj)}}
        return {"module": "builtins", "class_name": "function", "config": obj.__name__,
                "registered_name": "function"}
    if hasattr(obj, "get_config"):
        cls = type(obj)
        return {"module": cls.__module__, "class_name": cls.__name__,
                "config": obj.get_config(), "registered_name": cls.__name__}
    raise TypeError(
        f"Cannot serialize object of type {type(obj)}. To be serializable, a class "
        "must implement the `get_config()` method.")


def _func_dump(fn):
    """(code, defaults, closure) of a lambda, as ``keras.utils.python_utils.func_dump``."""
    code = codecs.encode(marshal.dumps(fn.__code__), "base64").decode("ascii")
    closure = tuple(c.cell_contents for c in fn.__closure__) if fn.__closure__ else None
    return code, fn.__defaults__, closure
