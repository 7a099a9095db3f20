"""``conv3d info``: what a volume file holds (shape, dtype, geometry; ``--stats``: values)."""

from __future__ import annotations

import json

import click

from .complete import VolumePath


@click.command(short_help="Describe a volume file.")
@click.argument("input", metavar="INPUT", type=VolumePath())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--stats", is_flag=True,
              help="Also read the voxels, region by region, for min, max, mean and NaN count.")
def info(input, as_json, stats):
    """Print INPUT's shape, dtype (as read: scaled NIfTI/Analyze data are float32) and
    geometry: affine, voxel size and units, or what the format cannot hold; NIfTI:
    sform/qform codes, scaling, TR of 4-D series, header extensions. Reads no voxels
    unless --stats.

    \b
    Example:
      conv3d info scan.nii.gz --stats
    """
    import numpy as np

    from ..io import open_volume
    from ..io.registry import BY_NAME

    vol = open_volume(input, header_only=not stats)
    try:
        # The dtype by name whatever the byte order (every MGH file and some NIfTI and
        # TIFF files are big-endian); the byte order is its own field.
        data = {"path": str(vol.spec), "format": vol.spec.format, "shape": list(vol.shape),
                "dtype": vol.dtype.name}
        if vol.dtype.byteorder == ">" or (vol.dtype.byteorder == "=" and not np.little_endian):
            data["byte_order"] = "big-endian"
        if vol.affine is not None:
            data["affine"] = np.round(vol.affine, 6).tolist()
            data["voxel_size"] = [round(float(v), 6) for v in
                                  np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0))]
            if vol.geometry.units is not None:
                data["units"] = list(vol.geometry.units)
        else:
            data["geometry"] = (f"none: this {BY_NAME[vol.spec.format].title} volume holds no "
                                "voxel size or origin (outputs lie on its voxel grid)")
        data.update(vol.details)  # the format's own header fields
        text = vol.details_text
        if stats:
            from ..io.stats import volume_stats
            data["stats"] = volume_stats(vol)
    finally:
        vol.close()
    if as_json:
        click.echo(json.dumps(data))
        return
    text = {**_text(data), **text}
    for key, value in data.items():
        click.echo(f"{key:<11}{text.get(key, value)}")


def _text(data):
    """How the format-neutral fields read in the listing."""
    text = {}
    if "units" in data:
        units = data["units"]
        text["units"] = units[0] if len(set(units)) == 1 else ", ".join(map(str, units))
    if "stats" in data:
        s = data["stats"]
        text["stats"] = (f"min {s['min']}, max {s['max']}, mean {s['mean']}, "
                         f"{s['nan_count']} NaN of {s['voxels']} voxels")
    if "scaling" in data:
        text["scaling"] = f"slope {data['scaling']['slope']}, intercept " \
                          f"{data['scaling']['intercept']} (applied on read)"
    if "tr" in data:
        text["tr"] = f"{data['tr']} {data.get('tr_unit', '')}".rstrip()
    return text
