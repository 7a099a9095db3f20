"""A named kernel (--kernel) is checked against --memory-limit before it is
made, as weights files and the kernels --filters/--kernel-size describe are."""

import pytest
from click.testing import CliRunner

from conv3d_cli.api import build_layer
from conv3d_cli.cli.main import cli
from conv3d_cli.errors import ArgumentError


@pytest.mark.parametrize("spec,shape", [
    ("gauss:sigma=1000vox", "8001x8001x8001"),
    ("box:99999", "99999x99999x99999"),
    ("sphere:20000vox", "40001x40001x40001"),
])
def test_a_filter_over_the_limit_is_refused_before_it_is_made(spec, shape):
    with pytest.raises(ArgumentError, match=rf"--kernel {spec}: its filter \({shape}\) takes "
                                            r"\d+ MiB, more than the memory limit of 64 MiB"):
        build_layer(kernel=spec, memory_limit="64M")


def test_the_kernel_for_all_channels_is_checked_too():
    with pytest.raises(ArgumentError, match=r"the kernel for 200 input channels "
                                            r"\(3x3x3x200x200\) takes 8 MiB"):
        build_layer(layer="Conv3DTranspose", kernel="box:3", input_channels=200,
                    memory_limit="4M")
    layer = build_layer(kernel="box:3", input_channels=200, memory_limit="4M")  # grouped
    assert layer.kernel.shape == (3, 3, 3, 1, 200)


def test_the_cli_says_it_in_one_line():
    r = CliRunner().invoke(cli, ["shape", "--input-shape", "1,8,8,8,1",
                                 "--kernel", "gauss:sigma=1000vox", "--memory-limit", "1G"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "--memory-limit" in lines[0] and "Error" not in lines[0][7:]
