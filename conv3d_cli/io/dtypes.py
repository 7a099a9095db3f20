"""The dtype an output file gets: the layer's compute dtype, unless the format
cannot store it or ``--output-dtype`` asks for another.

Float dtypes each format stores so that every reader understands them:

======  =======  =======  =======  ========
format  float16  float32  float64  bfloat16
======  =======  =======  =======  ========
.npy    yes      yes      yes      no
HDF5    yes      yes      yes      no
Zarr    yes      yes      yes      no
NIfTI   no       yes      yes      no
======  =======  =======  =======  ========

NIfTI-1 and -2 define no float16 data type, and no format here has a
bfloat16 type that readers without ``ml_dtypes`` understand (``.npy`` would
record raw 2-byte voids). A compute dtype the format lacks is widened to
float32, which holds every float16 and bfloat16 value exactly, with a note.
"""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentError
from .registry import BY_NAME, FORMATS

# --output-dtype values. "compute" (the default) and "input" name a dtype; the
# others are dtypes. Integer outputs (with rounding and clipping rules) would
# be further names here.
OUTPUT_DTYPES = ("compute", "input", "float16", "float32", "float64")

# Each format's storable floats are in its line of :data:`~conv3d_cli.io.registry.FORMATS`.


def output_dtype(requested, compute_dtype, input_dtype, fmt):
    """(NumPy dtype to write, note or None) for an output in format ``fmt``.

    ``requested`` is an ``--output-dtype`` value (None means "compute");
    ``compute_dtype`` the layer's (a name); ``input_dtype`` the input volume's.
    """
    requested = "compute" if requested is None else str(requested).lower()
    if requested not in OUTPUT_DTYPES:
        raise ArgumentError(f"Invalid `output_dtype`: {requested!r}. Expected one of "
                            f"{', '.join(OUTPUT_DTYPES)}.")
    fmt_name = BY_NAME[fmt].title if fmt in BY_NAME else fmt
    storable = BY_NAME[fmt].floats if fmt in BY_NAME else ("float32", "float64")
    if requested == "compute":
        if compute_dtype in storable:
            return np.dtype(compute_dtype), None
        return np.dtype(np.float32), (
            f"{fmt_name} cannot store {compute_dtype}: wrote float32, which holds every "
            f"{compute_dtype} result exactly")
    want = requested
    if requested == "input":
        input_dtype = np.dtype(input_dtype)
        if input_dtype.kind != "f":
            raise ArgumentError(
                f"--output-dtype input: the input is {input_dtype}; integer outputs are "
                "not supported (they need rounding and clipping rules). Use float16, "
                "float32 or float64.")
        want = input_dtype.name
    if want not in storable:
        raise ArgumentError(
            f"--output-dtype {requested}: {fmt_name} cannot store {want}; use "
            f"{' or '.join(storable)}" + _formats_storing(want))
    note = None
    if _narrower(want, compute_dtype):
        note = f"the {compute_dtype} results are rounded to {want}"
        if want == "float16":
            note += " (magnitudes above 65504 become inf)"
    return np.dtype(want), note


def _formats_storing(dtype):
    """", or a .npy, HDF5 or Zarr output": the formats that store ``dtype``."""
    names = [f.title for f in FORMATS if dtype in f.floats]
    if not names:
        return ""
    return ", or a " + (" or ".join(names) if len(names) < 3 else
                        ", ".join(names[:-1]) + " or " + names[-1]) + " output"


_PRECISION = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}


def _narrower(a, b) -> bool:
    """Whether dtype ``a`` cannot hold every value of ``b``."""
    return _PRECISION[a] < _PRECISION[b] or (a == "float16" and b == "bfloat16")
