"""``conv3d info``: what a volume file holds (shape, dtype, geometry)."""

from __future__ import annotations

import json

import click


@click.command(short_help="Describe a volume file.")
@click.argument("input", metavar="INPUT")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(input, as_json):
    """Print INPUT's shape, dtype and (NIfTI) affine, voxel size, sform/qform codes and
    header extensions, reading no voxels.

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
        if vol.is_nifti:
            data.update(_nifti_fields(vol.image.header))
    finally:
        vol.close()
    if as_json:
        click.echo(json.dumps(data))
        return
    for key, value in data.items():
        click.echo(f"{key:<11}{_text(key, value)}")


def _nifti_fields(header):
    """The orientation codes and the header extensions (code, name, size on disk)."""
    from nibabel.nifti1 import extension_codes

    from ..io.nifti import is_copied
    extensions = [{"code": int(e.get_code()), "name": _label(extension_codes, e.get_code()),
                   "bytes": int(e.get_sizeondisk()), "copied_to_outputs": is_copied(e)}
                  for e in header.extensions]
    return {"sform_code": int(header["sform_code"]), "qform_code": int(header["qform_code"]),
            "extensions": extensions}


def _label(codes, code):
    try:
        return codes.label[int(code)]
    except KeyError:
        return "unknown"


def _text(key, value):
    if key in ("sform_code", "qform_code"):
        from nibabel.nifti1 import xform_codes
        return f"{value} ({_label(xform_codes, value)})"
    if key == "extensions":
        return ", ".join(
            f"{e['name']} (code {e['code']}, {e['bytes']} bytes"
            f"{'' if e['copied_to_outputs'] else ', not copied to outputs'})"
            for e in value) or "none"
    return value
