"""Volume specs: ``scan.nii.gz``, ``vol.npy``, ``data.h5:/group/dataset``."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..errors import VolumeError
from .registry import BY_EXTENSION, expected_formats, extension, inner_path_extensions


@dataclass(frozen=True)
class VolumeSpec:
    path: str
    format: str
    dataset: str | None = None  # containers (HDF5, Zarr): the inner array's path

    def __str__(self):
        return f"{self.path}:{self.dataset}" if self.dataset else self.path

    @property
    def gzipped(self):
        return self.path.lower().endswith(".gz")


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
    for ext in inner_path_extensions():
        marker = ext + ":"
        i = low.rfind(marker)
        if i != -1:
            path, dataset = text[:i + len(ext)], text[i + len(marker):] or None
            break
    ext = extension(path)
    if ext not in BY_EXTENSION:
        raise VolumeError(
            f"{role} {text}: unknown volume format {ext or '(no extension)'!r}; expected "
            f"{expected_formats()}")
    if dataset is not None and not dataset.startswith("/"):
        dataset = "/" + dataset
    return VolumeSpec(path, BY_EXTENSION[ext].name, dataset)


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
