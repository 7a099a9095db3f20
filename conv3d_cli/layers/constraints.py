"""Keras weight constraints (``keras/src/constraints``): projections of weights.

Keras applies them after each optimizer update, never in the forward pass, so
a layer computes with its weights as they are. ``Layer.apply_constraints()``
(``--apply-constraints``) projects weights that came from elsewhere.
"""

from __future__ import annotations

import numpy as np

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
        desired = self.rate * np.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms
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


REGISTRY = Registry("constraint", "keras.constraints", Constraint)
for _cls in (MaxNorm, MinMaxNorm, NonNeg, UnitNorm):
    REGISTRY.register(_cls)
REGISTRY.register(MaxNorm, "maxnorm", "max_norm")
REGISTRY.register(NonNeg, "nonneg", "non_neg")
REGISTRY.register(UnitNorm, "unitnorm", "unit_norm")
REGISTRY.register(MinMaxNorm, "min_max_norm")


def get(identifier, argument="kernel_constraint"):
    return REGISTRY.get(identifier, argument)


def serialize(obj):
    return REGISTRY.serialize(obj)
