"""``conv3d info``: what a volume file holds (shape, dtype, geometry)."""

from __future__ import annotations

import json

import click


@click.command(short_help="Describe a volume file.")
@click.argument("input", metavar="INPUT")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(input, as_json):
    """Print INPUT's shape, dtype and geometry (NIfTI or OME-Zarr: affine, voxel size;
    NIfTI: sform/qform codes and header extensions), reading no voxels.

    \b
    Example:
      conv3d info scan.nii.gz
    """
    import numpy as np

    from ..io import open_volume

    vol = open_volume(input, header_only=True)
    try:
        data = {"path": str(vol.spec), "format": vol.spec.format, "shape": list(vol.shape),
                "dtype": str(vol.dtype)}
        if vol.affine is not None:
            data["affine"] = np.round(vol.affine, 6).tolist()
            data["voxel_size"] = [round(float(v), 6) for v in
                                  np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0))]
        data.update(vol.details)  # the format's own header fields
        text = vol.details_text
    finally:
        vol.close()
    if as_json:
        click.echo(json.dumps(data))
        return
    for key, value in data.items():
        click.echo(f"{key:<11}{text.get(key, value)}")
