"""The libhdf5 probe (a file's structure read in a child process first, with a
timeout: libhdf5 loops forever on some damaged files) where it meets the output
side: an existing HDF5 OUTPUT file is read as an input is, the links on the
dataset's path resolved one by one (an external link is not followed); a
stopped probe of a .keras archive leaves no unpacked weights behind."""

import os
import tempfile
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from conv3d_cli.cli.main import cli
from conv3d_cli.errors import WeightsError
from conv3d_cli.io import hdf5, keras_files

MODELS = os.path.join(FIXTURES, "models")


@pytest.fixture
def tmp(tmp_path):
    np.save(tmp_path / "in.npy", np.ones((4, 4, 4), np.float32))
    with h5py.File(tmp_path / "out.h5", "w") as f:
        f["keep"] = np.arange(3.0)
    return tmp_path


def _run(tmp, output, *extra):
    return CliRunner().invoke(cli, ["run", str(tmp / "in.npy"), output, "--filters", "1",
                                    "--kernel-size", "1", "--seed", "0", *extra])


def _one_line(result, *needles):
    assert result.exit_code not in (0, None), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_an_existing_output_whose_structure_never_loads_is_refused(tmp, monkeypatch):
    real = hdf5._existing

    def loops_in_the_child(*args):  # as libhdf5 does on some damaged files
        while hdf5._IN_PROBE:
            time.sleep(0.1)
        return real(*args)

    monkeypatch.setattr(hdf5, "_existing", loops_in_the_child)
    monkeypatch.setenv("CONV3D_HDF5_TIMEOUT", "1")
    before = (tmp / "out.h5").read_bytes()
    start = time.monotonic()
    _one_line(_run(tmp, f"{tmp}/out.h5:/y", "--overwrite"), "OUTPUT", "out.h5",
              "did not finish within 1 s")
    assert time.monotonic() - start < 30
    assert (tmp / "out.h5").read_bytes() == before
    assert sorted(os.listdir(tmp)) == ["in.npy", "out.h5"]


def test_an_external_link_on_the_outputs_path_is_not_followed(tmp):
    with h5py.File(tmp / "other.h5", "w") as f:
        f.create_group("grp")
    with h5py.File(tmp / "out.h5", "a") as f:
        f["g"] = h5py.ExternalLink("other.h5", "/grp")
    before = (tmp / "other.h5").read_bytes()
    _one_line(_run(tmp, f"{tmp}/out.h5:/g/y"), "out.h5", "/g is an external link")
    assert (tmp / "other.h5").read_bytes() == before


def test_an_existing_output_is_still_written_beside_its_datasets(tmp):
    with h5py.File(tmp / "out.h5", "a") as f:
        f["alias"] = h5py.SoftLink("/grp")
        f.create_group("grp")
    r = _run(tmp, f"{tmp}/out.h5:/alias/y")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp / "out.h5", "r") as f:
        assert f["grp/y"].shape == (4, 4, 4)
        np.testing.assert_array_equal(f["keep"][...], np.arange(3.0))


def test_a_stopped_probe_of_a_keras_archive_leaves_nothing_unpacked(tmp_path, monkeypatch):
    real = keras_files.LayerEntry.weight_shapes

    def loops_in_the_child(self):  # after the child unpacked model.weights.h5
        while hdf5._IN_PROBE:
            time.sleep(0.1)
        return real(self)

    monkeypatch.setattr(keras_files.LayerEntry, "weight_shapes", loops_in_the_child)
    monkeypatch.setenv("CONV3D_HDF5_TIMEOUT", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(WeightsError, match="keras3.keras: reading its HDF5 structure did not "
                                           "finish within 1 s"):
        keras_files.ModelFile(os.path.join(MODELS, "keras3.keras"))
    assert os.listdir(tmp_path) == []
