"""One exception hierarchy for the whole tool.

Every error a user can cause is a :class:`Conv3DError`. The CLI turns these
into one-line messages and a non-zero exit status; anything else is a bug and
is reported as an internal error. Argument errors are also ``ValueError`` so
that the Python API raises what Keras raises.
"""


class Conv3DError(Exception):
    """Base class of every error the tool reports to its user."""


class ArgumentError(Conv3DError, ValueError):
    """An invalid layer argument, option, or combination of them."""


class ShapeError(Conv3DError, ValueError):
    """An input, kernel or output shape that does not fit the layer."""


class VolumeError(Conv3DError):
    """A volume file that is missing, unreadable, corrupt or of a bad type."""


class WeightsError(Conv3DError, ValueError):
    """A weights or config file that is missing, corrupt or does not fit."""


class OutputExistsError(Conv3DError):
    """The output exists and ``overwrite`` was not requested."""


class EngineError(Conv3DError):
    """The compute engine failed (e.g. a worker process died)."""



def brief(value, limit=80, _inner=False) -> str:
    """``value`` as ``f"{value}"`` shows it in an error message, except that an
    array appears by its shape and dtype, never its contents (a kernel's repr
    would flood the message), and long values are cut short."""
    if getattr(value, "ndim", 0) and hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<array shape={tuple(value.shape)} dtype={value.dtype}>"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(brief(v, limit, True) for v in value)
        text = f"[{inner}]" if isinstance(value, list) else f"({inner}{',' * (len(value) == 1)})"
        return text if len(text) <= limit else f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, dict):
        text = "{" + ", ".join(f"{k!r}: {brief(v, limit, True)}" for k, v in value.items()) + "}"
        return text if len(text) <= 4 * limit else text[:4 * limit - 3] + "..."
    text = repr(value) if _inner else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
