"""``conv3d run --boundary``: edges other than Keras's zeros (issue 11, part 4), against SciPy."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from conftest import assert_close
from conv3d_cli.boundary import source_index
from conv3d_cli.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def scipy_same(x, kernel, bias, strides, dilation, mode):
    """Keras's 'same' Conv3D with SciPy's ``mode`` at the edges: ``ndimage.correlate``
    of each channel with the dilated kernel, placed by ``origin`` so that output
    ``i`` reads input ``i + t - pad_before``, then every ``s``-th output kept."""
    n = x.shape[:3]
    c_in, filters = kernel.shape[3:]
    ke = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:3], dilation)]
    out = [-(-a // s) for a, s in zip(n, strides)]
    pad = [max((o - 1) * s + e - a, 0) // 2 for o, s, e, a in zip(out, strides, ke, n)]
    origin = [p - e // 2 for p, e in zip(pad, ke)]
    y = np.zeros((*out, filters))
    for f in range(filters):
        for c in range(c_in):
            w = np.zeros(ke)
            w[::dilation[0], ::dilation[1], ::dilation[2]] = kernel[..., c, f]
            z = ndimage.correlate(x[..., c].astype(np.float64), w, mode=mode, origin=origin)
            y[..., f] += z[::strides[0], ::strides[1], ::strides[2]]
        y[..., f] += bias[f]
    return y


def renormalized(x, kernel, bias, strides, dilation):
    """fslmaths -fmean at the edges: zero-padded sums / the kernel mass inside * its total."""
    sums = scipy_same(x, kernel, np.zeros(kernel.shape[-1]), strides, dilation, "constant")
    mass = scipy_same(np.ones_like(x), kernel, np.zeros(kernel.shape[-1]), strides, dilation,
                      "constant")
    return sums / mass * kernel.sum(axis=(0, 1, 2, 3)) + bias


CASES = {  # kernel shape (k, C, F), strides, dilation; shapes with an axis shorter than the pad
    "strided": ((3, 4, 2, 2, 2), (2, 1, 3), (1, 1, 1)),
    "dilated": ((3, 2, 3, 2, 1), (1, 1, 1), (2, 1, 3)),
}


def _files(tmp_path, rng, shape, kshape, positive=False):
    x = rng.standard_normal(shape).astype(np.float32)
    k = (rng.random(kshape) if positive else rng.standard_normal(kshape)).astype(np.float32)
    b = rng.standard_normal(kshape[-1]).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    np.savez(tmp_path / "w.npz", kernel=k, bias=b)
    return x, k, b


@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("mode", ["nearest", "reflect", "wrap"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_modes_equal_scipy_with_strides_dilation_and_tiles(tmp_path, rng, mode, method, case):
    kshape, strides, dilation = CASES[case]
    x, k, b = _files(tmp_path, rng, (7, 2, 9, 2), kshape)  # H = 2: shorter than some pads
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--weights", tmp_path / "w.npz",
            "--padding", "same", "--strides", ",".join(map(str, strides)), "--dilation-rate",
            ",".join(map(str, dilation)), "--boundary", mode, "--method", method,
            "--chunk-shape", "2,1,2", "--workers", "1", "-q")
    assert r.exit_code == 0, r.output
    assert_close(np.load(tmp_path / "out.npy"), scipy_same(x, k, b, strides, dilation, mode))


@pytest.mark.parametrize("mode", ["nearest", "reflect", "wrap", "renormalize"])
def test_winograd_equals_scipy(tmp_path, rng, mode):
    """Winograd (3x3x3, stride 1, 8 channels and filters) obeys the mode as well."""
    x, k, b = _files(tmp_path, rng, (6, 5, 7, 8), (3, 3, 3, 8, 8), positive=True)
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--weights", tmp_path / "w.npz",
            "--padding", "same", "--boundary", mode, "--method", "winograd",
            "--chunk-shape", "4,3,4", "--workers", "1", "-q")
    assert r.exit_code == 0, r.output
    ones = (1, 1, 1)
    ref = renormalized(x, k, b, ones, ones) if mode == "renormalize" else \
        scipy_same(x, k, b, ones, ones, mode)
    assert_close(np.load(tmp_path / "out.npy"), ref)


@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_renormalize_is_fslmaths_fmean_at_edges(tmp_path, rng, method, case):
    kshape, strides, dilation = CASES[case]
    x, k, b = _files(tmp_path, rng, (7, 4, 9, 2), kshape, positive=True)
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--weights", tmp_path / "w.npz",
            "--padding", "same", "--strides", ",".join(map(str, strides)), "--dilation-rate",
            ",".join(map(str, dilation)), "--boundary", "renormalize", "--method", method,
            "--chunk-shape", "2,2,2", "--workers", "1", "--activation", "relu",
            "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "not Keras" in r.output
    ref = np.maximum(renormalized(x, k, b, strides, dilation), 0)
    assert_close(np.load(tmp_path / "out.npy"), ref)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["boundary"] == "renormalize"
    assert any("not Keras" in n for n in report["not_keras"])


def test_renormalize_keeps_a_constant_volume_constant(tmp_path):
    np.save(tmp_path / "in.npy", np.full((5, 6, 7), 3.0, np.float32))
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--kernel", "gauss:sigma=1vox",
            "--boundary", "renormalize", "-q")
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), 3.0, rtol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "reflect", "wrap"])
def test_source_index_is_scipys_extension(mode):
    """A line holding its own indices, read 9 voxels beyond each edge by SciPy:
    a one-tap kernel at either end of 19 taps reads x[i - 9] or x[i + 9]."""
    line = np.arange(4.0)
    for tap, shift in ((0, -9), (18, 9)):
        w = np.zeros(19)
        w[tap] = 1
        got = ndimage.correlate1d(line, w, mode=mode)
        assert got.tolist() == source_index(np.arange(4) + shift, 4, mode).tolist()
    assert source_index(np.arange(-3, 0), 4, "reflect").tolist() == [2, 1, 0]


@pytest.mark.parametrize("args, message", [
    (["--padding", "valid"], "needs padding='same'"),
    (["--padding", "same", "--layer", "Conv3DTranspose"], "for Conv3D only"),
])
def test_refusals(tmp_path, rng, args, message):
    np.save(tmp_path / "in.npy", rng.standard_normal((5, 6, 7)).astype(np.float32))
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--filters", "1", "--kernel-size", "3",
            "--boundary", "reflect", *args)
    assert r.exit_code != 0 and message in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.npy").exists()


def test_renormalize_refuses_a_kernel_without_mass(tmp_path, rng):
    np.save(tmp_path / "in.npy", rng.standard_normal((5, 6, 7)).astype(np.float32))
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--kernel", "sobel",
            "--boundary", "renormalize")
    assert r.exit_code != 0 and "filter 0's kernel sums to 0" in r.output
