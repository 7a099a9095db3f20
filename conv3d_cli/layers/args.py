"""Normalise layer arguments the way Keras does, with Keras's error wording."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, brief

SUPPORTED_DTYPES = ("float32", "float64")


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


def default_data_format() -> str:
    """``image_data_format`` from keras.json ($KERAS_HOME, else ~/.keras), else channels_last."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = Path(home) / "keras.json"
    try:
        value = json.loads(path.read_text()).get("image_data_format", "channels_last")
    except (OSError, ValueError, AttributeError):
        return "channels_last"
    return value if value in ("channels_last", "channels_first") else "channels_last"


def standardize_data_format(value):
    if value is None:
        return default_data_format()
    data_format = str(value).lower()
    if data_format not in ("channels_first", "channels_last"):
        raise ArgumentError(
            'The `data_format` argument must be one of {"channels_first", "channels_last"}. '
            f"Received: data_format={value}")
    return data_format


def standardize_dtype(value) -> str:
    """Keras 3 dtype policy (string or DTypePolicy dict) -> a NumPy float dtype name."""
    if value is None:
        return "float32"
    if isinstance(value, dict):  # {"class_name": "DTypePolicy", "config": {"name": ...}}
        value = (value.get("config") or {}).get("name", "float32")
    name = str(np.dtype(value).name) if not isinstance(value, str) else value.lower()
    if name == "float":
        name = "float64"
    if name not in SUPPORTED_DTYPES:
        raise ArgumentError(
            f"Unsupported `dtype`: {value!r}. Expected one of {', '.join(SUPPORTED_DTYPES)} "
            "(Keras computes Conv3D in float32 by default).")
    return name


def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ArgumentError(
            f"Invalid value for argument `{name}`. Expected a strictly positive value. "
            f"Received {name}={brief(value)}.")
    return int(value)
