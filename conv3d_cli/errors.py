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
