"""``conv3d preview``: orthogonal slices of volumes through one world point, as a PNG."""

from __future__ import annotations

import json
import os

import click
import numpy as np

from .. import viz
from ..errors import ArgumentError, OutputExistsError, VolumeError

ROW_INCHES = 2.6  # height of a row's tallest panel
MAX_PANELS_INCHES = 14  # width of a row's three panels, at most (elongated volumes)
DPI = 100
BACKGROUND = (0.12, 0.12, 0.28)  # samples outside a volume
# Per plane: the world axis it holds fixed, and those drawn across and up.
PANEL_F = {p: a[0] for p, a in viz.PLANES.items()}
PANEL_H = {p: a[1] for p, a in viz.PLANES.items()}
PANEL_V = {p: a[2] for p, a in viz.PLANES.items()}


def _floats3(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = [float(p) for p in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or not np.all(np.isfinite(numbers)):
        raise click.BadParameter(f"expected three comma-separated numbers (e.g. 10,-22.5,4), "
                                 f"got {value!r}", ctx=ctx, param=param)
    return tuple(numbers)


def _percentiles(ctx, param, value):
    try:
        lo, hi = (float(p) for p in value.split(","))
    except ValueError:
        lo = hi = None
    if lo is None or not 0 <= lo < hi <= 100:
        raise click.BadParameter(f"expected two percentiles P1,P2 with 0 <= P1 < P2 <= 100 "
                                 f"(e.g. 1,99), got {value!r}", ctx=ctx, param=param)
    return lo, hi


@click.command(short_help="Orthogonal slices through one world point, as a PNG.")
@click.argument("volumes", nargs=-1, required=True, metavar="VOLUME [MORE...]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .png to write.")
@click.option("--at", "at", callback=_floats3, default=None, metavar="X,Y,Z",
              help="World point (RAS+, the volumes' units, e.g. mm). Default: the centre "
                   "of the first VOLUME.")
@click.option("--at-voxel", callback=_floats3, default=None, metavar="I,J,K",
              help="The point as a voxel index of the first VOLUME.")
@click.option("--channel", type=click.IntRange(min=0), default=None,
              help="Channel (filter) to show of a volume with channels. Default: 0.")
@click.option("--frame", type=click.IntRange(min=0), default=None,
              help="Frame to show: the batch/time index, or the 4th axis of a 4-D NIfTI. "
                   "Default: 0.")
@click.option("--data-format", default=None, metavar="channels_last|channels_first",
              help="Channel axis of .npy/HDF5/Zarr arrays of rank >= 4, as for conv3d run.")
@click.option("--window", callback=_percentiles, default="1,99", show_default=True,
              metavar="P1,P2", help="Intensity window: percentiles of the shown planes, per row.")
@click.option("--vmin", type=float, default=None, help="Fixed lower end of the window.")
@click.option("--vmax", type=float, default=None, help="Fixed upper end of the window.")
@click.option("--cmap", default="gray", show_default=True, help="A matplotlib colormap.")
@click.option("--max-size", type=click.IntRange(16, 4096), default=512, show_default=True,
              help="Most samples along a panel's side (coarser sampling beyond).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              default=None, help="Write each panel's pixel box and world range as JSON "
                                 "('-' for stdout).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No notes and no summary line.")
def preview(volumes, output, at, at_voxel, channel, frame, data_format, window, vmin, vmax,
            cmap, max_size, json_path, overwrite, quiet):
    """Draw axial, coronal and sagittal slices of each VOLUME through one world point,
    one row per volume, into a PNG.

    Every volume is placed by its own geometry (NIfTI affine, OME-Zarr scale and
    translation), so an input and its strided or transposed output line up on
    the same world point; .npy, HDF5 and plain Zarr have none and are shown
    with voxel = world. Samples are the nearest voxel (no interpolation). The
    view is neurological: the subject's left on the image's left, anterior and
    superior up. Needs matplotlib (pip install matplotlib).

    \b
    Example:
      conv3d preview brain.nii.gz edges.nii.gz --channel 2 -o slices.png
      conv3d preview scan.nii.gz down.nii.gz --at 12,-30,8 -o check.png
    """
    if at is not None and at_voxel is not None:
        raise ArgumentError("give --at or --at-voxel, not both")
    if vmin is not None and vmax is not None and vmax <= vmin:
        raise ArgumentError(f"--vmax must be above --vmin. Received: vmin={vmin}, vmax={vmax}")
    from ..layers.args import standardize_data_format
    _check_output(output, overwrite)
    colormap = _colormap(_require_matplotlib(), cmap)
    opened = _open_all(volumes, channel, frame, standardize_data_format(data_format))
    sources = [source for _, source in opened]
    try:
        point = _point(sources[0], at, at_voxel)
        grid = viz.world_grid(sources, max_size)
        if not any(s.contains(point) for s in sources):
            raise ArgumentError(f"the point {_fmt(point)} lies outside every volume "
                                f"(together they span {_span(grid)}; --at is in world "
                                "units, --at-voxel takes voxel indices)")
        shown = [_sample_row(vol, s, grid, point, window, vmin, vmax) for vol, s in opened]
    finally:
        for vol, _ in opened:
            vol.close()
    if not quiet:
        for s in sources:
            for note in _notes(s, point):
                click.echo(f"note: {note}", err=True)
    layout = _render(shown, grid, point, output, colormap)
    if json_path:
        _write_json(json_path, layout)
    if not quiet:
        click.echo(f"wrote {output} ({layout['width']}x{layout['height']} px, "
                   f"{len(shown)} volume(s) at {_fmt(point)})", err=True)


def _open_all(volumes, channel, frame, data_format):
    """[(open volume, its SliceSource)]; nothing left open if one fails."""
    from ..io import open_volume
    opened = []
    try:
        for spec in volumes:
            vol = open_volume(spec)
            opened.append((vol, None))
            opened[-1] = (vol, viz.slice_source(vol, channel, frame, data_format))
    except BaseException:
        for vol, _ in opened:
            vol.close()
        raise
    return opened


def _write_json(path, layout):
    text = json.dumps(layout, indent=2)
    if path == "-":
        click.echo(text)
        return
    with open(path, "w") as fh:
        fh.write(text + "\n")


def _check_output(output, overwrite):
    if not output.lower().endswith(".png"):
        raise VolumeError(f"OUTPUT {output}: expected a .png file")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise VolumeError(f"OUTPUT {output}: directory {parent} does not exist")
    if os.path.exists(output) and not overwrite:
        raise OutputExistsError(f"OUTPUT {output} exists; pass --overwrite to replace it")


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ArgumentError("conv3d preview needs matplotlib: pip install matplotlib (or "
                            "pip install \".[preview]\" in the conv3d clone)") from None
    return matplotlib


def _colormap(matplotlib, name):
    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ArgumentError(f"--cmap {name}: not a matplotlib colormap (e.g. gray, viridis, "
                            "magma)") from None
    return cmap.with_extremes(bad=BACKGROUND)


def _point(first, at, at_voxel):
    if at is not None:
        return np.asarray(at, float)
    if at_voxel is not None:
        return first.world(at_voxel)
    return first.centre()


def _sample_row(vol, source, grid, point, window, vmin, vmax):
    planes = {name: viz.sample_plane(vol.array, source, grid, name, point) for name in viz.PLANES}
    lo, hi = viz.intensity_window(list(planes.values()), window, vmin, vmax)
    return {"source": source, "planes": planes, "vmin": lo, "vmax": hi}


def _notes(source, point):
    if source.geometry == "none":
        yield (f"{source.name} has no geometry (not NIfTI or OME-Zarr): shown with voxel "
               "(i, j, k) = world (x, y, z)")
    if not source.contains(point):
        yield f"the point {_fmt(point)} lies outside {source.name}"


def _fmt(values):
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _span(grid):
    return " x ".join(f"{AX} {a:.4g}..{b:.4g}" for AX, (a, b) in
                      zip(viz.AXIS_NAMES, (grid.extent(i) for i in range(3))))


def _row_title(source, point):
    size = "×".join(f"{v:.3g}" for v in source.voxel_size)
    parts = [source.name, "×".join(map(str, source.shape))]
    if source.geometry == "none":
        parts.append("no geometry: voxel = world")
    else:
        parts.append(f"voxel {size} {source.unit}".rstrip())
    if source.label:
        parts.append(source.label)
    return "   ".join(parts) + f"\npoint at voxel {_fmt(source.voxel(point))}"


def _render(rows, grid, point, output, cmap):
    """Draw the rows, write the PNG atomically; the panels' pixel geometry as a dict."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    widths = [grid.extent(PANEL_H[p])[1] - grid.extent(PANEL_H[p])[0] for p in viz.PLANES]
    heights = [grid.extent(PANEL_V[p])[1] - grid.extent(PANEL_V[p])[0] for p in viz.PLANES]
    scale = min(ROW_INCHES / max(heights), MAX_PANELS_INCHES / sum(widths))  # inches per unit
    size = (sum(widths) * scale + 2.2, len(rows) * (max(heights) * scale + 1.2) + 0.4)
    fig = Figure(figsize=[round(v * DPI) / DPI for v in size], dpi=DPI,  # whole pixels
                 layout="constrained")
    FigureCanvasAgg(fig)
    subfigs = np.atleast_1d(fig.subfigures(len(rows), 1))
    drawn = []
    for sub, row in zip(subfigs, rows):
        source = row["source"]
        sub.suptitle(_row_title(source, point), fontsize=9, ha="left", x=0.01)
        axes = sub.subplots(1, 3, width_ratios=widths)
        for ax, name in zip(axes, viz.PLANES):
            image = _draw_panel(ax, name, row, grid, point, cmap)
        sub.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02)
        drawn.append(dict(zip(viz.PLANES, axes)))
    fig.supxlabel("Nearest-voxel samples on one world grid (spacing "
                  f"{grid.spacing:.3g}); neurological view: subject's left on the left",
                  fontsize=8)
    tmp = os.path.join(os.path.dirname(os.path.abspath(output)),
                       f".{os.path.basename(output)}.conv3d-{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        # The panels' boxes as that drawing placed them (layout and aspect applied).
        layout = _pixel_layout(fig, rows, drawn, grid, point)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return layout


def _axis_label(axis):
    return f"{viz.AXIS_NAMES[axis]}: {viz.AXIS_DIRECTIONS[axis]}"


def _draw_panel(ax, name, row, grid, point, cmap):
    h, v, f = PANEL_H[name], PANEL_V[name], PANEL_F[name]
    (x0, x1), (y0, y1) = grid.extent(h), grid.extent(v)
    image = ax.imshow(np.ma.masked_invalid(row["planes"][name]), cmap=cmap, origin="lower",
                      extent=(x0, x1, y0, y1), vmin=row["vmin"], vmax=row["vmax"],
                      interpolation="nearest", aspect="equal")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_title(f"{name}  {viz.AXIS_NAMES[f]} = {point[f]:.4g}", fontsize=8)
    ax.set_xlabel(_axis_label(h), fontsize=7)
    ax.set_ylabel(_axis_label(v), fontsize=7)
    ax.tick_params(labelsize=6)
    _crosshair(ax, point[h], point[v], (x0, x1), (y0, y1), 3 * grid.spacing)
    return image


def _crosshair(ax, px, py, xs, ys, gap):
    # Lines stop short of the point, so the voxel under it stays visible.
    style = dict(color=(1.0, 0.35, 0.35), linewidth=0.7, alpha=0.8)
    ax.plot([xs[0], px - gap], [py, py], **style)
    ax.plot([px + gap, xs[1]], [py, py], **style)
    ax.plot([px, px], [ys[0], py - gap], **style)
    ax.plot([px, px], [py + gap, ys[1]], **style)


def _pixel_layout(fig, rows, drawn, grid, point):
    """Each panel's box in PNG pixels (origin top left) and the world range it spans."""
    height = int(round(fig.bbox.height))
    out = {"width": int(round(fig.bbox.width)), "height": height,
           "point": [float(v) for v in point], "grid_spacing": grid.spacing,
           "view": "neurological: x (L->R) to the right; y (P->A) and z (I->S) upwards",
           "rows": []}
    for row, axes in zip(rows, drawn):
        s = row["source"]
        entry = {"name": s.name, "shape": list(s.shape), "geometry": s.geometry,
                 "voxel_size": list(s.voxel_size), "fixed_indices": {str(k): v for k, v
                                                                     in s.fixed.items()},
                 "point_voxel": [float(v) for v in s.voxel(point)], "inside": s.contains(point),
                 "vmin": row["vmin"], "vmax": row["vmax"], "panels": {}}
        for name, ax in axes.items():
            box = ax.get_window_extent()
            h, v = PANEL_H[name], PANEL_V[name]
            entry["panels"][name] = {
                "box": [float(box.x0), float(height - box.y1), float(box.x1),
                        float(height - box.y0)],  # left, top, right, bottom
                "horizontal": {"axis": viz.AXIS_NAMES[h], "range": list(grid.extent(h))},
                "vertical": {"axis": viz.AXIS_NAMES[v], "range": list(grid.extent(v))}}
        out["rows"].append(entry)
    return out
