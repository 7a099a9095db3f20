"""The ``conv3d`` click group: version, debug flag, and one-line errors."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from .. import __version__, signals
from ..errors import Conv3DError


class Conv3DGroup(click.Group):
    """Turns the tool's errors into one line on stderr and exit status 1.

    SIGINT, SIGTERM and SIGHUP unwind through the same clean-up as an error
    (see :mod:`conv3d_cli.signals`) and exit with 128 + the signal number.
    """

    def invoke(self, ctx):
        try:
            with signals.handled():
                try:
                    return super().invoke(ctx)
                except Exception as exc:
                    # A library may turn the signal's exception into its own error.
                    interrupted = signals.received()
                    if interrupted is None:
                        raise
                    interrupted.__notes__ = list(getattr(exc, "__notes__", ()))
                    raise interrupted from exc
        except Conv3DError as exc:
            if _debug(ctx):
                raise
            _fail(_with_notes(str(exc), exc))
        except click.UsageError as exc:  # bad option values: one line, exit 2
            if _debug(ctx):
                raise
            _fail(exc.format_message(), code=exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except (KeyboardInterrupt, signals.Terminated) as exc:
            if _debug(ctx):
                traceback.print_exc()
            kept = " ".join(getattr(exc, "__notes__", ()))
            _fail(f"interrupted by {signals.signal_name(exc)}; {kept or 'no output was written'}",
                  code=signals.exit_status(exc))
        except Exception as exc:  # a bug, or an error a library raised unexpectedly
            if _debug(ctx):
                raise
            _fail(_with_notes(f"{type(exc).__name__}: {exc} (run with conv3d --debug for a "
                              "traceback)", exc))


def _debug(ctx):
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get("CONV3D_DEBUG") == "1"


def verbose_logging():
    """``-v``: the library's log messages (``conv3d_cli`` logger) on stderr for this command."""
    import logging
    logger = logging.getLogger("conv3d_cli")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("conv3d: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: logger.removeHandler(handler))


def _with_notes(message, exc):
    """The message and what the failed run kept (``__notes__``, e.g. a Zarr partial store)."""
    notes = getattr(exc, "__notes__", ())
    return "; ".join([message.rstrip(". "), *notes]) if notes else message


def _fail(message, code=1):
    line = " ".join(str(message).split())
    click.echo(f"Error: {line}", err=True)
    sys.exit(code)


@click.group(cls=Conv3DGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="conv3d")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug):
    """Run one Keras Conv3D or Conv3DTranspose layer over a volume, exactly as Keras
    would, without Keras: NIfTI, HDF5, .npy, Zarr (OME-Zarr), MGH, Analyze,
    NRRD and TIFF (OME-TIFF), larger than memory, in parallel.

    \b
    Examples:
      conv3d run scan.nii.gz out.nii.gz --filters 1 --kernel-size 3 --padding same
      conv3d run em.zarr em_edges.zarr --weights edges.keras --workers 8
      conv3d shape scan.nii.gz --filters 8 --kernel-size 3 --strides 2
      conv3d info scan.nii.gz
      conv3d preview scan.nii.gz out.nii.gz -o slices.png
      conv3d layers model.keras
    """
    if debug:  # libraries' own logs (Dask's) are kept only when debugging
        logging.getLogger("conv3d").setLevel(logging.DEBUG)


def _register():
    from .export import export
    from .info import info
    from .layers import layers
    from .preview import preview
    from .run import run
    from .shape import shape
    for command in (run, shape, info, preview, layers, export):
        cli.add_command(command)


_register()


def main():
    cli(prog_name="conv3d")


if __name__ == "__main__":
    main()
