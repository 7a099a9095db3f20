"""conv3d_cli.build: weights are checked once, by the layer, before anything is allocated."""

import numpy as np
import pytest

from conv3d_cli import api, build
from conv3d_cli.build import build_layer
from conv3d_cli.errors import WeightsError
from conv3d_cli.layers import Conv3D, Conv3DTranspose


@pytest.mark.parametrize("cls,kernel", [
    (Conv3D, np.zeros((3, 3, 3, 1, 1), np.float32)),
    (Conv3DTranspose, np.zeros((3, 3, 3, 1, 1), np.float32)),
])
def test_set_weights_checks_shapes_before_building(cls, kernel):
    # A 61^3 kernel_size would take an initializer ~7 MB of draws to build; the
    # mismatch is known from the shapes alone, so nothing is built.
    layer = cls(1, 61)
    with pytest.raises(WeightsError, match=r"kernel weight shape \(61, 61, 61, 1, 1\) is not "
                                           r"compatible with provided weight shape \(3, 3, 3"):
        layer.set_weights([kernel, np.zeros(1, np.float32)])
    assert not layer.built and layer.kernel is None


def test_set_weights_on_an_unbuilt_layer_builds_it():
    layer = Conv3D(2, 3, groups=2)
    kernel = np.ones((3, 3, 3, 2, 2), np.float32)
    layer.set_weights([kernel, np.zeros(2, np.float32)])
    assert layer.built and layer.input_channels == 4
    assert np.array_equal(layer.kernel, kernel)


@pytest.mark.parametrize("overrides,bias,expected", [
    ({"filters": 2}, False, "Layer 'c' kernel weight shape (3, 3, 3, 1, 2) is not compatible "
                            "with provided weight shape (3, 3, 3, 1, 4). The layer has "
                            "filters=2, kernel_size=(3, 3, 3), use_bias=False; given: "
                            "kernel (3, 3, 3, 1, 4), no 'bias'"),
    ({"use_bias": True}, False, "expecting 2 weights. The layer has filters=4, kernel_size="
                                "(3, 3, 3), use_bias=True; given: kernel (3, 3, 3, 1, 4), "
                                "no 'bias'"),
    ({"use_bias": False}, True, "expecting 1 weights. The layer has filters=4, kernel_size="
                                "(3, 3, 3), use_bias=False; given: kernel (3, 3, 3, 1, 4), "
                                "bias (4,)"),
    ({"kernel_size": 5, "groups": 1}, True, "kernel weight shape (5, 5, 5, 1, 4) is not "
                                            "compatible"),
])
def test_weights_file_errors_name_the_file_the_layer_and_the_arrays(tmp_path, overrides, bias,
                                                                      expected):
    arrays = {"kernel": np.ones((3, 3, 3, 1, 4), np.float32)}
    if bias:
        arrays["bias"] = np.zeros(4, np.float32)
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(WeightsError) as info:
        build_layer(weights=str(tmp_path / "w.npz"), overrides={"name": "c", **overrides})
    message = str(info.value)
    assert message.startswith(f"--weights {tmp_path / 'w.npz'}: ")
    assert expected in message
    assert message.count("kernel (3, 3, 3, 1, 4)") == 1  # said once, not checked twice


def test_weights_from_a_dict_fill_in_the_arguments():
    kernel = np.ones((2, 3, 4, 1, 5), np.float32)
    layer = build_layer(weights={"kernel": kernel, "bias": None})
    assert (layer.filters, layer.kernel_size, layer.use_bias) == (5, (2, 3, 4), False)
    with pytest.raises(WeightsError, match=r"^--weights: the kernel must be 5-D"):
        build_layer(weights={"kernel": np.ones((3, 3, 3))})


def test_api_re_exports_the_builders():
    for name in ("build_layer", "check_kernel_fits", "infer_class", "is_model_file",
                 "load_config_file"):
        assert getattr(api, name) is getattr(build, name)
