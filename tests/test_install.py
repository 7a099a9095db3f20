"""A non-editable install runs from outside the clone (README, "Install").

The package is built from a copy of only what packaging reads (pyproject.toml,
README.md, conv3d_cli/) and installed with pip into a fresh venv, which sees
this environment's dependencies through a ``.pth`` line but not its editable
conv3d (the editable hook is a ``.pth`` of that site-packages, and ``.pth``
files are read only in a venv's own site-packages). No download: ``--no-deps
--no-build-isolation --no-index``.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import conv3d_cli

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _run(args, **kwargs):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600,
                          check=True, **kwargs)


def _can_build_wheels():
    from importlib.metadata import PackageNotFoundError, version
    try:
        major, minor = (int(p) for p in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels(), reason="needs setuptools>=70.1 (the test extra)")
def test_non_editable_install_runs_outside_the_clone(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "conv3d_cli"), src / "conv3d_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    deps = sysconfig.get_paths()["purelib"]  # numpy, nibabel, ..., pip, setuptools
    with open(os.path.join(site.stdout.strip(), "deps.pth"), "w") as fh:
        fh.write(deps + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "--ignore-installed", src])

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([python, "-c", "import conv3d_cli; print(conv3d_cli.__file__)"], cwd=work,
                 env=env)
    assert where.stdout.strip().startswith(str(venv))
    conv3d = venv / "bin" / "conv3d"
    version = _run([conv3d, "--version"], cwd=work, env=env)
    assert version.stdout.strip() == f"conv3d, version {conv3d_cli.__version__}"
    np.save(work / "in.npy", np.ones((5, 5, 5), np.float32))
    kernel = np.ones((3, 3, 3, 1, 1), np.float32)
    np.savez(work / "w.npz", kernel=kernel)
    _run([conv3d, "run", "in.npy", "out.npy", "--weights", "w.npz", "--workers", "1", "-q"],
         cwd=work, env=env)
    np.testing.assert_allclose(np.load(work / "out.npy"), np.full((3, 3, 3), 27.0))

