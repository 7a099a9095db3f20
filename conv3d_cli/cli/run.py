"""``conv3d run``: volume in, volume out."""

from __future__ import annotations

import json
import os

import click

from ..errors import Conv3DError
from .options import OUTPUT_DTYPES, engine_options, layer_from_kwargs, layer_options


@click.command(short_help="Apply the layer to a volume file.")
@click.argument("input", metavar="INPUT")
@click.argument("output", metavar="OUTPUT")
@layer_options
@engine_options
@click.option("--save-weights", type=click.Path(dir_okay=False), default=None,
              help="Write the kernel and bias used to this .npz.")
@click.option("--output-dtype", type=click.Choice(OUTPUT_DTYPES, case_sensitive=False),
              default="compute", show_default=True,
              help="OUTPUT's dtype: the layer's compute dtype (float32 where the format has "
                   "no float16/bfloat16), the input's (float inputs), or a float dtype.")
@click.option("--report", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write a JSON report (shapes, params, config, method, seconds, losses); "
                   "- for stdout.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUTPUT, --save-weights and --report if they exist (in an HDF5 "
                   "file or Zarr store: only the named dataset or array).")
@click.option("--scheduler", default=None, metavar="ADDRESS|local",
              help="Run the tiles on a Dask cluster (tcp://host:8786), or 'local' for a "
                   "LocalCluster here. Needs dask.distributed (the distributed extra).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run into a Zarr OUTPUT, skipping written tiles.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr for work over about a second.")
@click.option("--tmp-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where a .nii.gz INPUT is decompressed. Default: $CONV3D_TMPDIR, else "
                   "OUTPUT's directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@click.option("-v", "--verbose", is_flag=True,
              help="Log to stderr where temporary files go and what is cleaned up.")
def run(input, output, save_weights, output_dtype, report, overwrite, scheduler, resume, progress,
        quiet, tmp_dir, verbose, **kwargs):
    """Apply one Conv3D / Conv3DTranspose layer to INPUT and write OUTPUT.

    INPUT and OUTPUT are .npy, .nii, .nii.gz, HDF5 (file.h5:/group/dataset;
    OUTPUT's dataset defaults to /data) or Zarr (store.zarr[:/group/array];
    OME-Zarr images are read at level 0). A 3-D scan is one volume with one
    channel; the NIfTI affine (OME-Zarr transforms) of OUTPUT place every voxel
    where it lies.

    \b
    Example:
      conv3d run brain.nii.gz edges.nii.gz --filters 1 --kernel-size 3 \\
          --padding same --weights sobel.npz
    """
    if verbose:
        from .main import verbose_logging
        verbose_logging()
    method, workers = kwargs.pop("method"), kwargs.pop("workers")
    memory_limit, chunk_shape = kwargs.pop("memory_limit"), kwargs.pop("chunk_shape")
    # Every output path is checked before any work; the small files are written
    # under temporary names and put in place only once OUTPUT is (_SideFiles).
    side = _SideFiles(output, save_weights, report, overwrite)
    layer = layer_from_kwargs(kwargs, input=input, memory_limit=memory_limit)
    try:
        result = apply_to_file(layer, input, output, overwrite=overwrite, method=method.lower(),
                               workers=workers, memory_limit=memory_limit,
                               chunk_shape=chunk_shape, progress=progress and not quiet,
                               scheduler=scheduler, resume=resume, tmp_dir=tmp_dir,
                               output_dtype=output_dtype,
                               before_commit=lambda result: side.stage(layer, result))
        side.commit(result["output"])
    except BaseException:
        side.abort()
        raise
    if report == "-":
        click.echo(json.dumps(result, indent=2))
    if not quiet and report != "-":
        for note in result["plan"].get("notes", []) + result.get("output_notes", []):
            click.echo(f"note: {note}", err=True)
        if result["output_dtype_note"]:
            click.echo(f"note: {result['output_dtype_note']}", err=True)
        click.echo(f"wrote {result['output']} {tuple(result['file_output_shape'])} "
                   f"({result['method']}, {result['tiles']} tiles, {result['workers']} "
                   f"workers, {result['seconds']:.2f} s)", err=True)


def apply_to_file(*args, **kwargs):
    """:func:`conv3d_cli.api.apply_to_file`, imported when a run starts (not for --help)."""
    from ..api import apply_to_file
    return apply_to_file(*args, **kwargs)


class _SideFiles:
    """``--save-weights`` and ``--report``: checked first, committed right after OUTPUT."""

    def __init__(self, output, save_weights, report, overwrite):
        from ..io.paths import parse_spec
        from ..io.tempfiles import StagedFile
        from ..weights import check_weights_path
        self.staged = []
        self.weights = check_weights_path(save_weights, overwrite) if save_weights else None
        self.report = None
        if report and report != "-":
            self.report = StagedFile(report, overwrite, f"--report {report}")
        names = [("OUTPUT", parse_spec(output, "OUTPUT").path)]
        names += [("--save-weights", save_weights)] if save_weights else []
        names += [("--report", report)] if self.report else []
        seen = {}
        for option, path in names:
            key = os.path.abspath(path)
            if key in seen:
                raise click.BadParameter(f"{option} {path} is also {seen[key]}'s path; "
                                         "give each output its own file")
            seen[key] = option

    def stage(self, layer, result):
        """Write both files under their temporary names (OUTPUT is complete, not yet in place)."""
        if self.weights is not None:
            from ..weights import stage_weights
            stage_weights(self.weights, layer.kernel, layer.bias if layer.use_bias else None)
            self.staged.append(self.weights)
        if self.report is not None:
            with self.report.open("w") as fh:
                fh.write(json.dumps(result, indent=2) + "\n")
            self.staged.append(self.report)

    def commit(self, output):
        for staged in self.staged:
            try:
                staged.commit()
            except (OSError, Conv3DError) as exc:
                raise click.ClickException(f"OUTPUT {output} was written, but {staged.what} "
                                           f"could not be: {exc}") from None
        self.staged = []

    def abort(self):
        for staged in (self.weights, self.report):
            if staged is not None:
                staged.abort()
