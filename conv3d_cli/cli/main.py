"""The ``conv3d`` click group: version, debug flag, and one-line errors."""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..errors import Conv3DError


class Conv3DGroup(click.Group):
    """Turns the tool's errors into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Conv3DError as exc:
            if _debug(ctx):
                raise
            _fail(str(exc))
        except click.UsageError as exc:  # bad option values: one line, exit 2
            if _debug(ctx):
                raise
            _fail(exc.format_message(), code=exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail("interrupted; no output was written", code=130)
        except Exception as exc:  # a bug, or an error a library raised unexpectedly
            if _debug(ctx):
                raise
            _fail(f"{type(exc).__name__}: {exc} (run with conv3d --debug for a traceback)")


def _debug(ctx):
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get("CONV3D_DEBUG") == "1"


def _fail(message, code=1):
    line = " ".join(str(message).split())
    click.echo(f"Error: {line}", err=True)
    sys.exit(code)


@click.group(cls=Conv3DGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="conv3d")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug):
    """Run one Keras Conv3D or Conv3DTranspose layer over a volume, exactly as Keras
    would, without Keras: NIfTI, HDF5, .npy and Zarr (OME-Zarr), larger than
    memory, in parallel.

    \b
    Examples:
      conv3d run scan.nii.gz out.nii.gz --filters 1 --kernel-size 3 --padding same
      conv3d run em.zarr em_edges.zarr --weights edges.keras --workers 8
      conv3d shape scan.nii.gz --filters 8 --kernel-size 3 --strides 2
      conv3d info scan.nii.gz
      conv3d preview scan.nii.gz out.nii.gz -o slices.png
      conv3d layers model.keras
    """


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
