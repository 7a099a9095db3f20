"""Layer weights from ``.npz`` / ``.npy`` files, and back. Never unpickles."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from .errors import WeightsError
from .layers.args import BFLOAT16


def load_weights(path):
    """``{"kernel": array, "bias": array or None}`` from a ``.npz``, ``.npy`` or NIfTI file.

    A ``.npz`` holds ``kernel`` and optionally ``bias`` (``arr_0`` / ``arr_1``,
    as ``np.savez(*layer.get_weights())`` writes, are accepted too); a
    ``.npy`` holds the kernel alone: 5-D in Keras layout, or a 3-D kernel
    image. A kernel image (3-D ``.npy`` (kd, kh, kw), or NIfTI (X, Y, Z) as
    fslmaths ``-kernel file`` reads it) is a one-filter, one-channel kernel
    ``(kd, kh, kw, 1, 1)``, applied as stored: Conv3D correlates with it
    (``out[i] = sum_k in[i + k - c] w[k]``), as fslmaths does; Convert3D's
    ``-conv`` convolves (mirrors the kernel), so flip an asymmetric one to
    match it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"--weights {path}: no such file")
    low = path.lower()
    if low.endswith((".nii", ".nii.gz")):
        return {"kernel": _nifti_kernel(path), "bias": None}
    if not low.endswith((".npy", ".npz")):
        raise WeightsError(
            f"--weights {path}: expected a .npz (kernel, bias) or .npy (kernel) file, or a "
            "NIfTI kernel image (.nii, .nii.gz)")
    # np.load is given an open file, not the path: given a path it leaks its
    # handle when a .npz is not a valid zip archive.
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise WeightsError(f"--weights {path}: cannot be read ({exc.strerror})") from None
    with fh:
        return _load(fh, path, low.endswith(".npy"))


def _load(fh, path, is_npy):
    """The arrays of the open file ``fh``; every failure as a WeightsError."""
    try:
        if is_npy:
            return {"kernel": _kernel_array(np.load(fh, allow_pickle=False), path), "bias": None}
        with np.load(fh, allow_pickle=False) as data:
            names = list(data.files)
            if "kernel" in names:
                kernel, bias = data["kernel"], data["bias"] if "bias" in names else None
            elif "arr_0" in names and set(names) <= {"arr_0", "arr_1"}:
                kernel, bias = data["arr_0"], data["arr_1"] if "arr_1" in names else None
            else:
                raise WeightsError(
                    f"--weights {path}: expected arrays named 'kernel' and optionally "
                    f"'bias'; the file holds: {', '.join(names) or 'nothing'}")
            return {"kernel": _real(kernel, path, "kernel"),
                    "bias": None if bias is None else _real(bias, path, "bias")}
    except WeightsError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise WeightsError(f"--weights {path}: holds pickled objects, which are refused") from None
        raise WeightsError(f"--weights {path}: not a valid NumPy file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"--weights {path}: corrupt or truncated ({exc})") from None


def _kernel_array(a, path):
    """A .npy kernel: 5-D as it is, a 3-D kernel image as (kd, kh, kw, 1, 1)."""
    a = _real(a, path, "kernel")
    if a.ndim == 3:
        return a.reshape(a.shape + (1, 1))
    if a.ndim != 5:
        raise WeightsError(f"--weights {path}: expected a 5-D Keras kernel (kd, kh, kw, in, out) "
                           f"or a 3-D kernel image (kd, kh, kw); got shape {a.shape}")
    return a


def _nifti_kernel(path):
    """A NIfTI kernel image (X, Y, Z), scaled by scl_slope/scl_inter, in voxel order as stored."""
    import nibabel as nib
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for bad files
        raise WeightsError(f"--weights {path}: not a valid NIfTI file ({exc})") from None
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1): one volume
        data = data[..., 0]
    if data.ndim != 3:
        raise WeightsError(f"--weights {path}: a NIfTI kernel image must be 3-D (X, Y, Z); "
                           f"got shape {shape}")
    data = _real(np.asarray(data), path, "kernel")
    return data.reshape(data.shape + (1, 1))


def _real(a, path, name):
    if a.dtype.hasobject or a.dtype.kind not in "biuf":
        raise WeightsError(f"--weights {path}: '{name}' must hold real numbers, got dtype {a.dtype}")
    return a


def save_weights(path, kernel, bias=None, overwrite=True):
    """Write ``kernel`` and ``bias`` to ``path`` (.npz) atomically."""
    staged = stage_weights(path, kernel, bias, overwrite)
    try:
        staged.commit()
    except BaseException:
        staged.abort()
        raise


def check_weights_path(path, overwrite=True):
    """A :class:`~conv3d_cli.io.tempfiles.StagedFile` for ``--save-weights path`` (checked now)."""
    from .io.tempfiles import StagedFile
    path = os.fspath(path)
    if not path.lower().endswith(".npz"):
        raise WeightsError(f"--save-weights {path}: expected a .npz file name")
    return StagedFile(path, overwrite, f"--save-weights {path}")


def stage_weights(path_or_staged, kernel, bias=None, overwrite=True):
    """Write the .npz under its temporary name; ``commit()`` the result to put it in place."""
    staged = path_or_staged if hasattr(path_or_staged, "commit") else \
        check_weights_path(path_or_staged, overwrite)
    arrays = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    # .npz has no bfloat16 type (it would store raw 2-byte voids): bfloat16
    # weights are written as float32, which holds each of them exactly.
    arrays = {k: v.astype(np.float32) if v.dtype == BFLOAT16 else v for k, v in arrays.items()}
    try:
        with staged.open("wb") as fh:
            np.savez(fh, **arrays)
    except BaseException:
        staged.abort()
        raise
    return staged
