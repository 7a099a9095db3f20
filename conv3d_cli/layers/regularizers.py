"""Keras weight regularizers (``keras/src/regularizers``) computed in NumPy.

A penalty is accumulated in float64 and reported as a Python float; Keras
computes it in float32, which agrees to float32 rounding.
"""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentError
from .registry import Registry


def _validate(value, name):
    if not isinstance(value, (int, float)) or value != value or value < 0:
        raise ArgumentError(
            f"Value for argument `{name}` must be a non-negative float. Received: {name}={value}")
    return float(value)


class Regularizer:
    def __call__(self, x) -> float:
        return 0.0

    def get_config(self):
        return {}

    # Per-tile partial sums, so the activity penalty can be accumulated over
    # tiles without holding the whole output: (sum |x|, sum x**2).
    def partial_sums(self, x):
        x = np.asarray(x, dtype=np.float64)
        return float(np.abs(x).sum()), float(np.square(x).sum())

    def from_sums(self, l1_sum, l2_sum) -> float:
        raise NotImplementedError


class L1L2(Regularizer):
    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = _validate(l1, "l1")
        self.l2 = _validate(l2, "l2")

    def __call__(self, x):
        return self.from_sums(*self.partial_sums(x))

    def from_sums(self, l1_sum, l2_sum):
        return self.l1 * l1_sum + self.l2 * l2_sum

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(L1L2):
    def __init__(self, l1=0.01):
        super().__init__(l1=l1)

    def get_config(self):
        return {"l1": self.l1}


class L2(L1L2):
    def __init__(self, l2=0.01):
        super().__init__(l2=l2)

    def get_config(self):
        return {"l2": self.l2}


class OrthogonalRegularizer(Regularizer):
    def __init__(self, factor=0.01, mode="rows"):
        self.factor = _validate(factor, "factor")
        if mode not in ("rows", "columns"):
            raise ArgumentError(
                "Invalid value for argument `mode`. Expected one of {'rows', 'columns'}. "
                f"Received: mode={mode}")
        self.mode = mode

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ArgumentError(
                "Inputs to OrthogonalRegularizer must have rank 2. Received: "
                f"inputs.shape={x.shape}")
        if self.mode == "columns":
            x = x.T
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        product = x @ x.T
        size = product.shape[0]
        off = product - np.diag(np.diag(product))
        return float(self.factor * np.abs(off).sum() / (size * (size - 1)))

    def get_config(self):
        return {"factor": self.factor, "mode": self.mode}


REGISTRY = Registry("regularizer", "keras.regularizers", Regularizer)
REGISTRY.register(L1)
REGISTRY.register(L2)
REGISTRY.register(L1L2, "l1l2")
# Keras 2's l1_l2() function: both factors default to 0.01.
REGISTRY.register(L1L2, "l1_l2", l1=0.01, l2=0.01)
REGISTRY.register(OrthogonalRegularizer)


def get(identifier, argument="kernel_regularizer"):
    return REGISTRY.get(identifier, argument)


def serialize(obj):
    return REGISTRY.serialize(obj)
