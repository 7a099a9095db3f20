"""Shell completion: file names for paths, the valid values for choices.

click asks a parameter's type (or its ``shell_complete``) what may follow what
was typed. A path completes as ``CompletionItem(incomplete, type="file")``:
the shell itself then lists files, as it would without completion installed.
Completion runs on every TAB, so this module imports nothing but click and
the standard library (tests/test_startup.py watches it).

A volume path may name an array inside a file or store (``scan.h5:/group/data``,
``store.zarr:/level/0``); after the ``:`` the array names inside complete.
"""

from __future__ import annotations

import json
import os

import click
from click.shell_completion import CompletionItem

# The values each option takes, written out so that completing them loads no
# layer code (tests/test_completion.py pins them equal to the library's).
LAYER_CLASSES = ("Conv3D", "Conv3DTranspose")
PADDINGS = ("valid", "same")
DATA_FORMATS = ("channels_last", "channels_first")
DTYPE_POLICIES = ("float32", "float64", "float16", "bfloat16", "mixed_float16",
                  "mixed_bfloat16")
ACTIVATIONS = ("celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid",
               "hard_silu", "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid",
               "log_softmax", "mish", "relu", "relu6", "selu", "sigmoid", "silu",
               "soft_shrink", "softmax", "softplus", "softsign", "sparse_plus",
               "sparse_sigmoid", "sparsemax", "squareplus", "swish", "tanh", "tanh_shrink",
               "threshold")

# Containers whose arrays are named after a ':' (conv3d_cli.io.paths).
_HDF5 = (".h5", ".hdf5", ".hdf", ".he5")
_ZARR = (".zarr",)
_MAX_INNER = 200  # names listed from one container at most


def choices(values):
    """A ``shell_complete`` for an option taking one of ``values`` (any case)."""
    def complete(ctx, param, incomplete):
        typed = incomplete.lower()
        return [CompletionItem(v) for v in values if v.lower().startswith(typed)]
    return complete


def activation(ctx, param, incomplete):
    """Activation names; nothing once ``NAME:`` starts its JSON arguments."""
    if ":" in incomplete:
        return []
    return choices(ACTIVATIONS)(ctx, param, incomplete)


class VolumePath(click.ParamType):
    """A volume file, or ``FILE:/inner/array`` for HDF5 and Zarr: kept as typed
    (the I/O layer parses it), completed as a file name or an inner array."""

    name = "path"

    def convert(self, value, param, ctx):
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    def shell_complete(self, ctx, param, incomplete):
        container, sep, inner = incomplete.partition(":")
        if sep and container.lower().endswith(_HDF5 + _ZARR) and os.path.exists(container):
            return [CompletionItem(f"{container}:{name}")
                    for name in inner_arrays(container) if name.startswith(inner or "/")]
        return [CompletionItem(incomplete, type="file")]


def inner_arrays(container):
    """``/``-rooted names of the arrays in an HDF5 file or Zarr store (at most
    ``_MAX_INNER``; none if it cannot be read)."""
    try:
        if container.lower().endswith(_ZARR):
            return _zarr_arrays(container)
        return _hdf5_datasets(container)
    except Exception:  # completion must never fail: a bad file completes nothing
        return []


def _zarr_arrays(store):
    """Arrays of a Zarr v2 (``.zarray``) or v3 (``zarr.json``, node_type array) store."""
    names = []
    for folder, subfolders, files in os.walk(store):
        if _is_zarr_array(folder, files):
            names.append("/" + os.path.relpath(folder, store).replace(os.sep, "/"))
            subfolders[:] = []  # an array's chunks are no arrays
        subfolders.sort()
        if len(names) >= _MAX_INNER:
            break
    return sorted(n for n in names if n != "/.")


def _is_zarr_array(folder, files):
    if ".zarray" in files:
        return True
    if "zarr.json" in files:
        with open(os.path.join(folder, "zarr.json")) as fh:
            return json.load(fh).get("node_type") == "array"
    return False


def _hdf5_datasets(path):
    import h5py  # only when completing inside an HDF5 file

    names = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            names.append("/" + name)
        return True if len(names) >= _MAX_INNER else None
    with h5py.File(path, "r") as fh:
        fh.visititems(visit)
    return names
