"""``conv3d run``: volume in, volume out."""

from __future__ import annotations

import json

import click

from ..api import apply_to_file
from ..io.dtypes import OUTPUT_DTYPES
from ..weights import save_weights as write_weights
from .options import engine_options, layer_from_kwargs, layer_options


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
              help="Write a JSON report (shapes, params, config, method, seconds, losses); - for stdout.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--scheduler", default=None, metavar="ADDRESS|local",
              help="Run the tiles on a Dask cluster (tcp://host:8786), or 'local' for a "
                   "LocalCluster here. Needs conv3d-cli[distributed].")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run into a Zarr OUTPUT, skipping written tiles.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr for work over about a second.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
def run(input, output, save_weights, output_dtype, report, overwrite, scheduler, resume,
        progress, quiet, **kwargs):
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
    method, workers = kwargs.pop("method"), kwargs.pop("workers")
    memory_limit, chunk_shape = kwargs.pop("memory_limit"), kwargs.pop("chunk_shape")
    layer = layer_from_kwargs(kwargs)
    result = apply_to_file(layer, input, output, overwrite=overwrite, method=method.lower(),
                           workers=workers, memory_limit=memory_limit,
                           chunk_shape=chunk_shape, progress=progress and not quiet,
                           scheduler=scheduler, resume=resume, output_dtype=output_dtype)
    if save_weights:
        write_weights(save_weights, layer.kernel, layer.bias if layer.use_bias else None)
    if report:
        text = json.dumps(result, indent=2)
        if report == "-":
            click.echo(text)
        else:
            with open(report, "w") as fh:
                fh.write(text + "\n")
    if not quiet and report != "-":
        if result["output_dtype_note"]:
            click.echo(f"note: {result['output_dtype_note']}", err=True)
        click.echo(f"wrote {result['output']} {tuple(result['file_output_shape'])} "
                   f"({result['method']}, {result['tiles']} tiles, {result['workers']} "
                   f"workers, {result['seconds']:.2f} s)", err=True)
