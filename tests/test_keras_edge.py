"""Inputs Keras accepts at the edges (issue 9, item 2), against what real Keras did.

The fixture tests/fixtures/keras_edge.json is written by tools/check_keras_edge.py
with Keras 3.15.1 (JAX and TensorFlow backends) and tf.keras 2.21; no Keras is
needed here.
"""

import json
import os
import re

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURES, assert_close
from conv3d_cli.api import apply_to_file, build_layer, describe
from conv3d_cli.cli.main import cli
from conv3d_cli.engine import plan_job
from conv3d_cli.errors import ArgumentError, ShapeError, WeightsError
from conv3d_cli.layers import constraints
from conv3d_cli.layers.conv import Conv3D, Conv3DTranspose
from reference import conv3d as ref_conv3d

with open(os.path.join(FIXTURES, "keras_edge.json")) as fh:
    KERAS = json.load(fh)
K3 = KERAS["keras3_jax"]
K3_TF = KERAS["keras3_tensorflow"]
K2 = KERAS["tf_keras2"]
CLASSES = {"Conv3D": Conv3D, "Conv3DTranspose": Conv3DTranspose}


def make(cls, kwargs, **extra):
    return CLASSES[cls](**kwargs, **extra)


def ok(result):
    return isinstance(result, dict) and "shape" in result


# ------------------------------------------------------------------ error order
def _which(message):
    """The argument an error message is about (Keras's wording or the tool's)."""
    rules = [
        ("kwargs", r"Unrecognized keyword|has no `groups`|has no `output_padding`"),
        ("filters_groups", r"filters must be evenly divisible"),
        ("channels_groups", r"input channels must be evenly divisible"),
        ("groups", r"groups must be a positive"),
        ("output_padding_rule", r"`output_padding` must be strictly less"),
        ("output_padding", r"`output_padding` argument"),
        ("kernel_size", r"`kernel_size`"),
        ("strides_dilation", r"`strides > 1`"),
        ("strides", r"`strides` argument"),
        ("padding", r"`padding` argument"),
        ("data_format", r"data_format"),
        ("activation", r"activation"),
        ("initializer", r"initializer"),
        ("regularizer", r"regularizer"),
        ("constraint", r"constraint"),
        ("filters", r"`filters`"),
        ("rank", r"min_ndim"),
        ("output_size", r"zero or negative"),
    ]
    for label, pattern in rules:
        if re.search(pattern, message):
            return label
    raise AssertionError(f"unclassified message: {message}")


@pytest.mark.parametrize("case", [c for c in K3["order"] if "result" in c],
                         ids=lambda c: f"{c['layer']}{sorted(c['kwargs'].items())}")
def test_first_of_several_wrong_arguments_is_the_one_keras_names(case):
    expected = case["result"]
    assert "error" in expected  # every case has two or more wrong arguments
    with pytest.raises(ValueError) as info:
        CLASSES[case["layer"]](**case["kwargs"])
    assert _which(str(info.value)) == _which(expected["message"]), \
        (str(info.value), expected["message"])


@pytest.mark.parametrize("case", [c for c in K3["order"] if "build" in c],
                         ids=lambda c: f"{c['kwargs']}{c['build_shape']}")
def test_build_and_call_check_in_keras_order(case):
    shape = tuple(case["build_shape"])
    with pytest.raises(ValueError) as info:
        Conv3D(**case["kwargs"]).build(shape)
    assert _which(str(info.value)) == _which(case["build"]["message"])
    with pytest.raises(ValueError) as info:
        Conv3D(**case["kwargs"])(np.zeros(shape, np.float32))
    assert _which(str(info.value)) == _which(case["call"]["message"])


def test_groups_mismatch_before_rank_complaint_message():
    with pytest.raises(ShapeError) as info:
        Conv3D(4, 3, groups=2).build((8, 8, 8, 3))
    assert str(info.value) == K3["order"][-3]["build"]["message"]
