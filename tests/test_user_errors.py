"""Errors in the user's terms: voxels, channels, file axes and the options that fix them.

The layer API keeps Keras's messages (tests/test_keras_edge.py); a run or
``conv3d shape`` on a file says what does not fit in the file's terms.
"""

import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conv3d_cli.cli.main import cli


def _fails(*args, code=1):
    r = CliRunner().invoke(cli, [*map(str, args)])
    assert r.exit_code == code, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ")
    return r.output.strip()


@pytest.fixture
def folder(tmp_path):
    np.save(tmp_path / "last.npy", np.zeros((1, 10, 12, 9, 3), np.float32))
    np.save(tmp_path / "first.npy", np.zeros((1, 2, 10, 12, 9), np.float32))
    nib.save(nib.Nifti1Image(np.zeros((20, 6, 16), np.float32), np.eye(4)), tmp_path / "s.nii")
    np.savez(tmp_path / "w2.npz", kernel=np.ones((3, 3, 3, 2, 4), np.float32))
    return tmp_path


def test_a_kernel_larger_than_the_volume_says_so_per_axis(folder):
    err = _fails("run", folder / "s.nii", folder / "o.npy", "--filters", 1, "--kernel-size",
                 "3,9,17")
    assert err == (f"Error: INPUT {folder / 's.nii'} (20, 6, 16): the kernel spans 3x9x17 voxels "
                   "(D, H, W), more than the volume's 20x6x16 along H and W: with padding valid "
                   "the output would have zero or negative size there; give --padding same (the "
                   "output keeps the volume's size) or a smaller kernel")
    assert sorted(os.listdir(folder)) == ["first.npy", "last.npy", "s.nii", "w2.npz"]


def test_a_dilated_kernel_counts_the_voxels_it_spans(folder):
    err = _fails("shape", folder / "last.npy", "--filters", 1, "--kernel-size", 3,
                 "--dilation-rate", "1,6,1")
    assert "the kernel spans 3x13x3 voxels (D, H, W) (kernel_size 3x3x3 at dilation_rate " \
           "1x6x1), more than the volume's 10x12x9 along H:" in err
    # 'same' pads the volume to the kernel: the same kernel then fits.
    r = CliRunner().invoke(cli, ["shape", str(folder / "last.npy"), "--filters", "1",
                                 "--kernel-size", "3", "--dilation-rate", "1,6,1",
                                 "--padding", "same", "--json"])
    assert r.exit_code == 0 and '"output_shape": [1, 10, 12, 9, 1]' in r.output


@pytest.mark.parametrize("option,value,listed", [
    ("--padding", "full", "'valid', 'same'"),
    ("--padding", "causal", "'valid', 'same'"),
    ("--data-format", "NDHWC", "'channels_last', 'channels_first'"),
])
def test_an_invalid_choice_lists_the_valid_ones(folder, option, value, listed):
    err = _fails("run", folder / "last.npy", folder / "o.npy", "--filters", 1, "--kernel-size",
                 3, option, value, code=2)
    assert err == f"Error: Invalid value for '{option}': '{value}' is not one of {listed}."
    assert "list/tuple" not in err


def test_choices_take_any_case(folder):
    r = CliRunner().invoke(cli, ["shape", str(folder / "last.npy"), "--filters", "1",
                                 "--kernel-size", "3", "--padding", "SAME",
                                 "--data-format", "Channels_Last", "--json"])
    assert r.exit_code == 0 and '"output_shape": [1, 10, 12, 9, 1]' in r.output


def test_a_wrong_channel_count_names_the_file_and_its_axis(folder):
    err = _fails("run", folder / "last.npy", folder / "o.npy", "--weights", folder / "w2.npz")
    assert err == (f"Error: INPUT {folder / 'last.npy'} (1, 10, 12, 9, 3): axis 4 (channels_last) "
                   "holds 3 channels, but the layer's weights (kernel shape (3, 3, 3, 2, 4)) "
                   "take 2 input channels")
    err = _fails("run", folder / "s.nii", folder / "o.npy", "--weights", folder / "w2.npz")
    assert "(20, 6, 16): the 3-D volume (no channel axis) holds 1 channel, but" in err


def test_a_wrong_data_format_suggests_the_other(folder):
    err = _fails("run", folder / "first.npy", folder / "o.npy", "--weights", folder / "w2.npz")
    assert "axis 4 (channels_last) holds 9 channels" in err
    assert err.endswith("take 2 input channels; if the channels are on the other axis, give "
                        "--data-format channels_first")
    r = CliRunner().invoke(cli, ["run", str(folder / "first.npy"), str(folder / "o.npy"),
                                 "--weights", str(folder / "w2.npz"), "--data-format",
                                 "channels_first", "-q"])
    assert r.exit_code == 0, r.output
    assert np.load(folder / "o.npy").shape == (1, 4, 8, 10, 7)


def test_the_layer_api_keeps_kerass_wording():
    from conv3d_cli.errors import ShapeError
    from conv3d_cli.layers import Conv3D
    with pytest.raises(ShapeError, match="Computed output size would be zero or negative"):
        Conv3D(1, 9).compute_output_shape((1, 8, 8, 8, 1))
    with pytest.raises(ValueError, match="must be a list/tuple or one of"):
        Conv3D(1, 3, padding="full")
