"""The dtype an output file gets: the layer's compute dtype, unless the format
cannot store it or ``--output-dtype`` asks for another.

Float dtypes each format stores so that every reader understands them:

==============  =======  =======  =======  ========
format          float16  float32  float64  bfloat16
==============  =======  =======  =======  ========
.npy            yes      yes      yes      no
HDF5            yes      yes      yes      no
Zarr            yes      yes      yes      no
NIfTI           no       yes      yes      no
MGH             no       yes      no       no
Analyze pair    no       yes      yes      no
NRRD            no       yes      yes      no
OME-TIFF        no       yes      yes      no
TIFF (ImageJ)   no       yes      no       no
==============  =======  =======  =======  ========

NIfTI-1 and -2 define no float16 data type, MGH and ImageJ no float64 (nor
float16), and no format here has a bfloat16 type that readers without
``ml_dtypes`` understand (``.npy`` would record raw 2-byte voids). A compute
dtype the format lacks is written as float32, with a note: float32 holds every
float16 and bfloat16 value exactly; float64 results are rounded.

Integer outputs (``int8``, ``uint8``, ``int16``, ``uint16``, ``int32``; or
``input`` for an integer input) are not Keras: the results are rounded half
to even (as ``numpy.rint``), clipped to the dtype's range (``+inf`` to its
maximum, ``-inf`` to its minimum) and NaN is written as 0, all in
:func:`to_integer`, the one place, before the write (:class:`IntegerSink`).
Every format stores them (NIfTI with ``scl_slope`` unset: the values are the
rounded results themselves) but MGH (only uint8, int16, int32) and ImageJ
TIFF (only uint8, uint16, int16), which refuse the others in one line.
"""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentError
from .registry import BY_NAME, FORMATS

# --output-dtype values. "compute" (the default) and "input" name a dtype; the
# others are dtypes.
INTEGER_DTYPES = ("int8", "uint8", "int16", "uint16", "int32")
OUTPUT_DTYPES = ("compute", "input", "float16", "float32", "float64") + INTEGER_DTYPES

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
        if _narrower("float32", compute_dtype):  # float64 into MGH, ImageJ TIFF
            return np.dtype(np.float32), (
                f"{fmt_name} cannot store {compute_dtype}: the results are rounded to float32")
        return np.dtype(np.float32), (
            f"{fmt_name} cannot store {compute_dtype}: wrote float32, which holds every "
            f"{compute_dtype} result exactly")
    want = requested
    if requested == "input":
        input_dtype = np.dtype(input_dtype)
        if input_dtype.kind in "iu":
            return _storable_integer(input_dtype, requested, fmt), integer_note(input_dtype)
        if input_dtype.kind != "f":
            raise ArgumentError(f"--output-dtype input: the input is {input_dtype}; expected "
                                "a float or integer input")
        want = input_dtype.name
    if want in INTEGER_DTYPES:
        return _storable_integer(np.dtype(want), requested, fmt), integer_note(want)
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


def _storable_integer(dtype, requested, fmt):
    """``dtype`` if format ``fmt`` stores it, else a one-line refusal."""
    if fmt in BY_NAME and dtype.name not in BY_NAME[fmt].ints:
        ints = BY_NAME[fmt].ints
        raise ArgumentError(
            f"--output-dtype {requested}: {BY_NAME[fmt].title} cannot store {dtype.name}; use "
            f"{', '.join(ints[:-1])} or {ints[-1]}" + _formats_storing(dtype.name))
    return dtype


def _formats_storing(dtype):
    """", or a .npy, HDF5 or Zarr output": the formats that store ``dtype``."""
    names = [f.title for f in FORMATS if dtype in f.floats + f.ints]
    if not names:
        return ""
    return ", or a " + (" or ".join(names) if len(names) < 3 else
                        ", ".join(names[:-1]) + " or " + names[-1]) + " output"


_PRECISION = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}


def _narrower(a, b) -> bool:
    """Whether dtype ``a`` cannot hold every value of ``b``."""
    return _PRECISION[a] < _PRECISION[b] or (a == "float16" and b == "bfloat16")


def integer_note(dtype):
    """What an integer output does to the results (the run's note)."""
    info = np.iinfo(dtype)
    return (f"not Keras: results rounded half to even, clipped to {np.dtype(dtype).name}'s "
            f"range [{info.min}, {info.max}], NaN written as 0")


def to_integer(block, dtype):
    """``block`` rounded half to even, clipped to ``dtype``'s range, NaN as 0.

    The arithmetic is in float64, which holds every int32 bound exactly
    (float32 would round 2**31 - 1 up to 2**31, out of range)."""
    info = np.iinfo(dtype)
    y = np.asarray(block, dtype=np.float64)
    y = np.nan_to_num(y, nan=0.0, posinf=float(info.max), neginf=float(info.min))
    y = np.clip(np.rint(y), info.min, info.max)
    return y.astype(dtype)


class IntegerSink:
    """A canonical sink that writes integer blocks (:func:`to_integer`) into ``sink``."""

    def __init__(self, sink, dtype):
        self.sink = sink
        self.dtype = np.dtype(dtype)
        self.shape = sink.shape
        self.parallel_writes = getattr(sink, "parallel_writes", False)

    def write(self, b0, b1, ranges, block):
        self.sink.write(b0, b1, ranges, to_integer(block, self.dtype))
