"""Normalise layer arguments the way Keras does, with Keras's error wording."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import ArgumentError, brief

# Keras's float dtype policies: name -> (compute dtype, variable dtype)
# (keras/src/dtype_policies/dtype_policy.py). A plain float dtype name keeps
# variables and computation in that dtype; the mixed policies keep float32
# variables and compute in float16 / bfloat16.
FLOAT_POLICIES = {
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "float16": ("float16", "float16"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "mixed_float16": ("float16", "float32"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}
# Keras's quantized policies are named "<mode>_from_<source policy>".
QUANTIZATION_MODES = ("int8", "int4", "float8", "gptq", "awq")
# Serialized policy classes: Keras 3 writes DTypePolicy (FloatDTypePolicy in
# 3.3-3.5), tf.keras 2 its mixed-precision Policy.
_FLOAT_POLICY_CLASSES = ("DTypePolicy", "FloatDTypePolicy", "Policy")
_QUANTIZED_POLICY_CLASSES = ("QuantizedDTypePolicy", "QuantizedFloat8DTypePolicy",
                             "Int4DTypePolicy", "GPTQDTypePolicy", "AWQDTypePolicy")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def standardize_tuple(value, n, name, allow_zero=False):
    """An int or n ints -> a tuple of n ints (``keras.utils.standardize_tuple``)."""
    error_msg = (f"The `{name}` argument must be a tuple of {n} integers. "
                 f"Received {name}={brief(value)}")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value_tuple = (int(value),) * n
    else:
        if isinstance(value, str):
            raise ArgumentError(error_msg)
        try:
            value_tuple = tuple(value)
        except TypeError:
            raise ArgumentError(error_msg) from None
        if len(value_tuple) != n:
            raise ArgumentError(error_msg)
        for v in value_tuple:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ArgumentError(
                    error_msg + f" including element {brief(v)} of type {type(v)}")
        value_tuple = tuple(int(v) for v in value_tuple)
    if allow_zero:
        bad, req = {v for v in value_tuple if v < 0}, ">= 0"
    else:
        bad, req = {v for v in value_tuple if v <= 0}, "> 0"
    if bad:
        raise ArgumentError(
            error_msg + f", including values {bad} that do not satisfy `value {req}`")
    return value_tuple


def standardize_padding(value):
    if not isinstance(value, str) or value.lower() not in ("valid", "same"):
        raise ArgumentError(
            "The `padding` argument must be a list/tuple or one of "
            f"{{'valid', 'same'}}. Received: {value}")
    return value.lower()


def _keras_json(key, default, allowed):
    """``key`` of keras.json ($KERAS_HOME, else ~/.keras) if one of ``allowed``, else
    ``default``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = Path(home) / "keras.json"
    try:
        value = json.loads(path.read_text()).get(key, default)
    except (OSError, ValueError, AttributeError):
        return default
    return value if value in allowed else default


def default_data_format() -> str:
    """``image_data_format`` from keras.json, else channels_last."""
    return _keras_json("image_data_format", "channels_last", ("channels_last", "channels_first"))


def standardize_data_format(value):
    if value is None:
        return default_data_format()
    data_format = str(value).lower()
    if data_format not in ("channels_first", "channels_last"):
        raise ArgumentError(
            'The `data_format` argument must be one of {"channels_first", "channels_last"}. '
            f"Received: data_format={value}")
    return data_format


@dataclass(frozen=True)
class DTypePolicy:
    """A Keras float dtype policy: variables kept in ``variable_dtype``, inputs
    and weights cast to ``compute_dtype`` for the computation and the result."""

    name: str

    @property
    def compute_dtype(self) -> str:
        return FLOAT_POLICIES[self.name][0]

    @property
    def variable_dtype(self) -> str:
        return FLOAT_POLICIES[self.name][1]

    def serialize(self) -> dict:
        """As Keras 3's ``get_config()`` writes a layer's ``dtype``."""
        return {"module": "keras", "class_name": "DTypePolicy",
                "config": {"name": self.name}, "registered_name": None}

    def __repr__(self):
        return f'<DTypePolicy "{self.name}">'


def numpy_dtype(name) -> np.dtype:
    """The NumPy dtype of a Keras dtype name (bfloat16 is ``ml_dtypes.bfloat16``)."""
    return BFLOAT16 if str(name) == "bfloat16" else np.dtype(name)


def is_float_dtype(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == BFLOAT16


def default_floatx() -> str:
    """``floatx`` from keras.json (Keras's default policy), else float32."""
    return _keras_json("floatx", "float32", ("float16", "bfloat16", "float32", "float64"))


def _unsupported(value, why=""):
    names = ", ".join(FLOAT_POLICIES)
    return ArgumentError(f"Unsupported `dtype`: {value!r}{why}. Expected a float dtype "
                         f"policy, one of {names}.")


def _policy_name(value):
    """The policy name a `dtype` argument stands for (string, dtype, or a serialized policy)."""
    if isinstance(value, dict):
        cls = value.get("class_name")
        cfg = value.get("config") if isinstance(value.get("config"), dict) else {}
        if cls in _QUANTIZED_POLICY_CLASSES:
            name = f"{cfg.get('mode')}_from_{cfg.get('source_name')}"
            raise _unsupported(name, f" ({cls}: a quantized layer; its weights are not "
                                     "floats, and only float policies are supported)")
        if cls == "DTypePolicyMap":
            raise _unsupported(cfg.get("default_policy"), " (a DTypePolicyMap: per-layer policies "
                               "of a quantized model; only float policies are supported)")
        if cls not in _FLOAT_POLICY_CLASSES or not isinstance(cfg.get("name"), str):
            raise _unsupported(value)
        return cfg["name"]
    if value is float:  # Keras maps Python's float to float32
        return "float32"
    if isinstance(value, str):
        return value
    try:
        return numpy_dtype(value).name
    except TypeError:
        raise _unsupported(value) from None


def standardize_dtype_policy(value) -> DTypePolicy:
    """A layer's ``dtype`` argument -> its :class:`DTypePolicy` (``keras.dtype_policies.get``).

    Takes a policy name (``"mixed_float16"``), a float dtype (``"float64"``,
    ``np.float16``), a policy, or a serialized policy as Keras 3
    (``{"class_name": "DTypePolicy", "config": {"name": ...}}``) and tf.keras 2
    (``{"class_name": "Policy", ...}``) write it. ``None`` is Keras's default,
    ``floatx`` of keras.json. Quantized policies (``int8_from_float32``) and
    policy maps are refused by name.
    """
    if isinstance(value, DTypePolicy):
        return value
    name = default_floatx() if value is None else _policy_name(value)
    if name.startswith(QUANTIZATION_MODES) and "_from_" in name:
        raise _unsupported(name, " (a quantized policy; only float policies are supported)")
    if name not in FLOAT_POLICIES:
        raise _unsupported(value)
    return DTypePolicy(name)


def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ArgumentError(
            f"Invalid value for argument `{name}`. Expected a strictly positive value. "
            f"Received {name}={brief(value)}.")
    return int(value)
