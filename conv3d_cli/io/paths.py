"""Volume specs: ``scan.nii.gz``, ``vol.npy``, ``data.h5:/group/dataset``."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..errors import VolumeError

HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf", ".he5")
FORMATS = {".npy": "npy", ".nii": "nifti", ".nii.gz": "nifti"}
FORMATS.update({ext: "hdf5" for ext in HDF5_EXTENSIONS})
FORMATS[".zarr"] = "zarr"
# Container formats whose path may carry an inner array: file.h5:/group/data
INNER_PATH_EXTENSIONS = HDF5_EXTENSIONS + (".zarr",)


@dataclass(frozen=True)
class VolumeSpec:
    path: str
    format: str
    dataset: str | None = None  # HDF5 only

    def __str__(self):
        return f"{self.path}:{self.dataset}" if self.dataset else self.path

    @property
    def gzipped(self):
        return self.path.lower().endswith(".gz")


def extension(path: str) -> str:
    low = path.lower().rstrip("/")
    if low.endswith(".nii.gz"):
        return ".nii.gz"
    return os.path.splitext(low)[1]


def refuse_input(spec: VolumeSpec, inputs) -> None:
    """Refuse an output that is one of the ``inputs`` (the same file or store by
    any name: a symlink, another spelling), even with --overwrite: the input is
    read while the output is written, and replacing it would destroy the input."""
    for other in inputs:
        if os.path.exists(spec.path) and os.path.exists(other.path) \
                and os.path.samefile(spec.path, other.path):
            raise VolumeError(f"OUTPUT {spec} is the input file {other}; write to another file")


def parse_spec(text: str, role: str = "INPUT") -> VolumeSpec:
    """Split ``file.h5:/dataset`` and pick the format from the extension."""
    text = os.fspath(text)
    path, dataset = text, None
    low = text.lower()
    for ext in INNER_PATH_EXTENSIONS:
        marker = ext + ":"
        i = low.rfind(marker)
        if i != -1:
            path, dataset = text[:i + len(ext)], text[i + len(marker):] or None
            break
    ext = extension(path)
    if ext not in FORMATS:
        raise VolumeError(
            f"{role} {text}: unknown volume format {ext or '(no extension)'!r}; expected "
            ".npy, .nii, .nii.gz, .h5/.hdf5 (file.h5:/group/dataset) or .zarr "
            "(store.zarr:/group/array)")
    if dataset is not None and not dataset.startswith("/"):
        dataset = "/" + dataset
    return VolumeSpec(path, FORMATS[ext], dataset)


def check_input_path(path, where, error=VolumeError, directory=False):
    """Refuse an input that cannot be read: missing, a directory where a file is
    expected (or a file where a directory store is), or not a regular file (a FIFO
    would block until someone writes to it, a device never ends). ``where`` names
    the file or option in the message."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{where}: no such {'store' if directory else 'file'}") from None
    except OSError as exc:
        raise error(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if directory:
        if not stat.S_ISDIR(st.st_mode):
            raise error(f"{where}: expected a directory (a Zarr store), found a file")
    elif stat.S_ISDIR(st.st_mode):
        raise error(f"{where}: is a directory, expected a file")
    elif not stat.S_ISREG(st.st_mode):
        raise error(f"{where}: not a regular file (a pipe, socket or device cannot be read "
                    "as a volume or weights)")
