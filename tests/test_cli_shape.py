"""``conv3d shape`` and ``conv3d info``."""

import json
import os

from click.testing import CliRunner

from conv3d_cli.cli.main import cli

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_data")


def test_shape_from_input_shape_json():
    r = CliRunner().invoke(cli, ["shape", "--input-shape", "4,28,28,28,1", "--filters", 8,
                                 "--kernel-size", 3, "--strides", 2, "--padding", "same", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["output_shape"] == [4, 14, 14, 14, 8] and info["params"] == 27 * 8 + 8
    assert info["padding"][0] == {"axis": "D", "pad_before": 0, "pad_after": 1}
    plan = info["plan"]
    assert plan["method"] in ("direct", "fft") and plan["tiles"] >= 1 and plan["flops"] > 0
    assert plan["estimated_peak_bytes"] > 0


def test_shape_reads_only_the_header_and_prints_text():
    r = CliRunner().invoke(cli, ["shape", os.path.join(SAMPLE, "brain.nii.gz"), "--weights",
                                 os.path.join(SAMPLE, "sobel3.npz"), "--padding", "same"])
    assert r.exit_code == 0, r.output
    assert "(48, 56, 40) -> (48, 56, 40, 3)" in r.output and "params         84" in r.output


def test_shape_transposed_crops():
    r = CliRunner().invoke(cli, ["shape", "--input-shape", "1,5,5,5,2",
                                 "--layer", "Conv3DTranspose", "--filters", 1,
                                 "--kernel-size", 4, "--strides", 2, "--padding", "same",
                                 "--json"])
    info = json.loads(r.output)
    assert info["output_shape"] == [1, 10, 10, 10, 1]
    assert info["padding"][0] == {"axis": "D", "crop_before": 1, "crop_after": 1}


def test_shape_errors():
    r = CliRunner().invoke(cli, ["shape", "--filters", 1, "--kernel-size", 3])
    assert r.exit_code != 0 and "--input-shape" in r.output
    r = CliRunner().invoke(cli, ["shape", "--input-shape", "1,2,8,8,1", "--filters", 1,
                                 "--kernel-size", 3])
    assert r.exit_code != 0 and "zero or negative" in r.output
    r = CliRunner().invoke(cli, ["shape", "--input-shape", "8,8,8,1", "--filters", 1,
                                 "--kernel-size", 3])
    assert r.exit_code != 0 and "min_ndim=5" in r.output


def test_info_json():
    r = CliRunner().invoke(cli, ["info", os.path.join(SAMPLE, "brain.nii.gz"), "--json"])
    info = json.loads(r.output)
    assert info["shape"] == [48, 56, 40] and info["dtype"] == "int16"
    assert [round(v, 3) for v in info["voxel_size"]] == [1.2, 1.0, 1.5]
    r = CliRunner().invoke(cli, ["info", os.path.join(SAMPLE, "cells.h5")])
    assert r.exit_code == 0 and "[32, 32, 32, 2]" in r.output
