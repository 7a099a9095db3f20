"""Deliberate bugs ("mutants") that the test suite must catch.

Each mutant is a text patch (file, old text, new text). For each one this
script copies the repository to a temporary folder, applies the patch there
(the working tree is never touched), runs the tests named for it and reports
whether they failed (the mutant is *killed*) or passed (it *survived*: the
suite would not notice that bug). Not part of ``make test``.

    .venv/bin/python tools/mutants.py               # every mutant, its own tests
    .venv/bin/python tools/mutants.py gelu halo     # mutants whose name contains a word
    .venv/bin/python tools/mutants.py --full gelu   # the whole suite instead
    .venv/bin/python tools/mutants.py --list

A patch whose old text no longer occurs exactly once is reported as STALE
(the code moved on): update its text here. Exit status 1 if any mutant
survived or is stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple  # pytest arguments (files or node ids) expected to catch it


M = Mutant
MUTANTS = [
    # --- the bugs of issue 9, item 4
    M("gelu-tanh-approximation", "conv3d_cli/layers/activations.py",
      "def _gelu(x, approximate=False):", "def _gelu(x, approximate=True):",
      ("tests/test_keras_golden.py",)),
    M("float64-with-float32-kernel", "conv3d_cli/engine/job.py",
      "k = np.asarray(self.kernel).astype(self.work_dtype)",
      "k = np.asarray(self.kernel).astype(np.float32)",
      ("tests/test_accuracy.py",)),
    M("float64-fft-with-float32-kernel-spectrum", "conv3d_cli/engine/fft.py",
      "dense = np.zeros(tuple(s for _, s in spans) + (g, cg, fg), dtype)",
      "dense = np.zeros(tuple(s for _, s in spans) + (g, cg, fg), np.float32)",
      ("tests/test_accuracy.py",)),
    M("float64-winograd-with-float32-transform", "conv3d_cli/engine/winograd.py",
      "np.ascontiguousarray(u.reshape((64,) + g.shape[3:]).astype(taps_w.dtype))",
      "np.ascontiguousarray(u.reshape((64,) + g.shape[3:]).astype(np.float32))",
      ("tests/test_accuracy.py",)),
    M("float64-scatter-with-float32-kernel", "conv3d_cli/engine/task.py",
      "job.kernel.astype(job.work_dtype), acc)", "job.kernel.astype(np.float32), acc)",
      ("tests/test_accuracy.py",)),
    M("float64-input-read-as-float32", "conv3d_cli/engine/task.py",
      "return block.astype(job.work_dtype, copy=False)",
      "return block.astype(np.float32, copy=False)",
      ("tests/test_accuracy.py",)),
    M("hdf5-written-by-forked-workers", "conv3d_cli/io/base.py",
      "    parallel_writes = False", "    parallel_writes = True",
      ("tests/test_file_executors.py",)),
    M("planner-budget-ignores-workers", "conv3d_cli/engine/plan.py",
      "budget = (limit - base) // max(workers, 1)", "budget = limit - base",
      ("tests/test_file_executors.py",)),
    M("planner-peak-ignores-workers", "conv3d_cli/engine/plan.py",
      "return self.process_bytes + self.workers * self.tile_bytes",
      "return self.process_bytes + self.tile_bytes",
      ("tests/test_file_executors.py",)),
    M("planner-forked-workers-cost-nothing", "conv3d_cli/engine/plan.py",
      "forked = workers if processes and workers > 1 else 0", "forked = 0",
      ("tests/test_file_executors.py",)),
    M("planner-halo-one-voxel-short", "conv3d_cli/engine/job.py",
      "return [(n - 1) * g.s + g.ke if g.kind", "return [(n - 1) * g.s + g.ke - 1 if g.kind",
      ("tests/test_file_executors.py",)),
    M("halo-one-voxel-short", "conv3d_cli/shapes.py",
      "i1 = (o1 - 1) * self.s - self.offset + self.ke",
      "i1 = (o1 - 1) * self.s - self.offset + self.ke - 1",
      ("tests/test_engine.py", "tests/test_shapes.py", "tests/test_accuracy.py")),
    M("transposed-halo-one-voxel-short", "conv3d_cli/shapes.py",
      "i1 = max(q_hi - min(ts) for _, _, ts, _, q_hi in raw)",
      "i1 = max(q_hi - min(ts) for _, _, ts, _, q_hi in raw) - 1",
      ("tests/test_engine.py", "tests/test_shapes.py", "tests/test_accuracy.py")),
    M("output-may-overwrite-input", "conv3d_cli/io/paths.py",
      'raise VolumeError(f"OUTPUT {spec} is the input file {other}; write to another file")',
      "pass",
      ("tests/test_file_executors.py",)),
    M("export-layer-without-build-config", "conv3d_cli/io/keras_export.py",
      '"registered_name": None,\n                 "build_config": {"input_shape": batch_shape}}',
      '"registered_name": None}',
      ("tests/test_keras_export_structure.py",)),
    M("export-weights-group-renamed", "conv3d_cli/io/keras_export.py",
      'f"layers/{to_snake_case(layer.keras_name)}/vars"',
      'f"layers/{to_snake_case(layer.keras_name)}/weights"',
      ("tests/test_keras_export_structure.py",)),
    M("export-vars-without-name", "conv3d_cli/io/keras_export.py",
      'group.attrs["name"] = layer.name', "pass",
      ("tests/test_keras_export_structure.py",)),
    M("export-wrong-module", "conv3d_cli/io/keras_export.py",
      'layer_cfg = {"module": "keras.layers",', 'layer_cfg = {"module": "keras.src.layers",',
      ("tests/test_keras_export_structure.py",)),
    # --- more of the same spirit
    M("same-padding-split-swapped", "conv3d_cli/shapes.py",
      "return total // 2, total - total // 2", "return total - total // 2, total // 2",
      ("tests/test_engine.py", "tests/test_shapes.py")),
    M("transposed-crop-left-off-by-one", "conv3d_cli/shapes.py",
      "return max((ke - s) // 2, 0)", "return max((ke - s) // 2 + 1, 0)",
      ("tests/test_engine.py", "tests/test_shapes.py")),
    M("transposed-crop-left-with-output-padding-off-by-one", "conv3d_cli/shapes.py",
      "return max(ke // 2 - (-(-output_padding // 2)), 0)",
      "return max(ke // 2 - (-(-output_padding // 2)) - 1, 0)",
      ("tests/test_engine.py", "tests/test_shapes.py")),
    M("bias-added-twice", "conv3d_cli/engine/task.py",
      "        acc[...] = bias\n    if stencil:", "        acc[...] = bias + bias\n    if stencil:",
      ("tests/test_engine.py",)),
    M("bias-added-twice-fused-stencil", "conv3d_cli/engine/stencil.py",
      "init = (np.asarray(bias, out.dtype) if assign",
      "init = (2 * np.asarray(bias, out.dtype) if assign",
      ("tests/test_engine.py",)),
    M("bias-added-twice-fused-fft", "conv3d_cli/engine/fft.py",
      "np.add(y[sel], bias, out=out[dst]", "np.add(y[sel], 2 * bias, out=out[dst]",
      ("tests/test_engine.py",)),
    M("softmax-on-channels-under-channels-first", "conv3d_cli/engine/job.py",
      'return 4 if self.data_format == "channels_last" else 3', "return 4",
      ("tests/test_engine.py", "tests/test_keras_golden.py")),
    M("dilation-ignored-in-halo", "conv3d_cli/shapes.py",
      "i1 = (o1 - 1) * self.s - self.offset + self.ke",
      "i1 = (o1 - 1) * self.s - self.offset + self.k",
      ("tests/test_engine.py", "tests/test_shapes.py")),
    M("output-padding-ignored", "conv3d_cli/shapes.py",
      "op = None if output_padding is None else output_padding[ax]", "op = None",
      ("tests/test_engine.py", "tests/test_shapes.py")),
    M("winograd-constant-0.4", "conv3d_cli/engine/winograd.py",
      "[[1, 0, 0], [0.5, 0.5, 0.5]", "[[1, 0, 0], [0.4, 0.5, 0.5]",
      ("tests/test_engine.py", "tests/test_accuracy.py")),
    M("fft-kernel-not-flipped", "conv3d_cli/engine/fft.py",
      "dense = dense[::-1, ::-1, ::-1]", "dense = dense",
      ("tests/test_engine.py",)),
    M("scatter-transpose-ignores-stride", "conv3d_cli/engine/direct.py",
      "steps = np.array([g.s for g in geoms], np.intp)", "steps = np.ones(3, np.intp)",
      ("tests/test_engine.py", "tests/test_accuracy.py")),
    M("nifti-affine-translation-sign", "conv3d_cli/geometry.py",
      "m[ax, 3] = t", "m[ax, 3] = -t",
      ("tests/test_io.py",)),
    M("nifti-transposed-affine-shift-sign", "conv3d_cli/shapes.py",
      "return (o - (c - self.offset)) / self.s", "return (o + (c - self.offset)) / self.s",
      ("tests/test_io.py",)),
    # The OME-Zarr output's scale is read from the moved affine: its step per
    # output voxel is set in one place, for every format.
    M("ome-zarr-scale-not-times-stride", "conv3d_cli/geometry.py",
      "m[ax, ax] = g.position(1) - t", "m[ax, ax] = 1.0",
      ("tests/test_distributed.py",)),
    M("zarr-chunks-larger-than-tiles", "conv3d_cli/apply.py",
      "return tuple(min(c, n) for c, n in zip(chunks, out_layout.shape))",
      "return tuple(min(2 * c, n) for c, n in zip(chunks, out_layout.shape))",
      ("tests/test_distributed.py", "tests/test_file_executors.py")),
    M("activity-sums-keep-last-tile-only", "conv3d_cli/engine/execute.py",
      "self.sums = (self.sums[0] + sums[0], self.sums[1] + sums[1])",
      "self.sums = (sums[0], sums[1])",
      ("tests/test_engine.py",)),
    M("axiswise-activation-tiles-split-w", "conv3d_cli/engine/plan.py",
      "if a != whole and tile[a] >= 2 * min_len[a]:", "if tile[a] >= 2 * min_len[a]:",
      ("tests/test_engine.py", "tests/test_file_executors.py")),
    M("keras-json-ignored", "conv3d_cli/layers/args.py",
      'return _keras_json("image_data_format", "channels_last", '
      '("channels_last", "channels_first"))',
      'return "channels_last"',
      ("tests/test_keras_home.py",)),
    M("keras-home-ignored", "conv3d_cli/layers/args.py",
      'home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")',
      'home = os.path.join(os.path.expanduser("~"), ".keras")',
      ("tests/test_keras_home.py",)),
    # --- --boundary (not Keras): conv3d_cli/boundary.py
    M("boundary-reflect-as-mirror", "conv3d_cli/boundary.py",
      "j = np.mod(i, 2 * n)\n        return np.where(j < n, j, 2 * n - 1 - j)",
      "j = np.mod(i, 2 * n - 2)\n        return np.where(j < n, j, 2 * n - 2 - j)",
      ("tests/test_boundary.py",)),
    M("boundary-renormalize-scale-dropped", "conv3d_cli/boundary.py",
      "y = np.asarray(block, np.float64) * scale", "y = np.asarray(block, np.float64)",
      ("tests/test_boundary.py",)),
    M("boundary-renormalize-mass-on-wrong-axes", "conv3d_cli/boundary.py",
      "ind = [_inside(g, o0, o1) for g, (o0, o1) in zip(self.job.geoms, ranges)]",
      "ind = [_inside(g, o0, o1) for g, (o0, o1) in zip(self.job.geoms[::-1], ranges)]",
      ("tests/test_boundary.py",)),
    M("boundary-extended-index-off-by-one", "conv3d_cli/boundary.py",
      "idx = source_index(np.arange(a - pad, z - pad), n, self.mode)",
      "idx = source_index(np.arange(a - pad + 1, z - pad + 1), n, self.mode)",
      ("tests/test_boundary.py",)),
    # --- --per-volume: conv3d_cli/series.py, the series' TR in io/nifti.py
    M("per-volume-input-x-y-swapped", "conv3d_cli/series.py",
      "    return (3, 0, 1, 2, None)\n", "    return (3, 1, 0, 2, None)\n",
      ("tests/test_per_volume.py",)),
    M("per-volume-output-x-y-swapped", "conv3d_cli/series.py",
      "return (4, (3, 0, 1, 2, None))", "return (4, (3, 1, 0, 2, None))",
      ("tests/test_per_volume.py",)),
    M("per-volume-tr-not-kept", "conv3d_cli/io/nifti.py",
      "    _clear_non_spatial(header, series)\n", "    _clear_non_spatial(header)\n",
      ("tests/test_per_volume.py",)),
    # --- integer outputs: io/dtypes.py to_integer
    M("integer-round-half-up", "conv3d_cli/io/dtypes.py",
      "y = np.clip(np.rint(y), info.min, info.max)",
      "y = np.clip(np.floor(y + 0.5), info.min, info.max)",
      ("tests/test_output_int.py",)),
    M("integer-nan-not-zero", "conv3d_cli/io/dtypes.py",
      "y = np.nan_to_num(y, nan=0.0, posinf=float(info.max), neginf=float(info.min))",
      "y = np.clip(y, info.min, info.max)",
      ("tests/test_output_int.py",)),
    M("integer-not-clipped", "conv3d_cli/io/dtypes.py",
      "y = np.clip(np.rint(y), info.min, info.max)", "y = np.rint(y)",
      ("tests/test_output_int.py",)),
    # --- the formats
    M("nrrd-lps-x-not-flipped", "conv3d_cli/io/nrrd_io.py",
      '"left-posterior-superior": (-1, -1, 1)', '"left-posterior-superior": (1, -1, 1)',
      ("tests/test_formats_nrrd.py",)),
    M("nrrd-output-not-lps", "conv3d_cli/io/nrrd_io.py",
      'lps[:3] *= np.array(SPACE_TO_RAS["lps"], dtype=np.float64)[:, None]',
      'lps[:3] *= np.array(SPACE_TO_RAS["las"], dtype=np.float64)[:, None]',
      ("tests/test_formats_nrrd.py",)),
    M("tiff-imagej-read-x-y-resolution-swapped", "conv3d_cli/io/tiff.py",
      'for name in ("YResolution", "XResolution"):', 'for name in ("XResolution", "YResolution"):',
      ("tests/test_formats_tiff.py",)),
    M("tiff-imagej-write-x-y-resolution-swapped", "conv3d_cli/io/tiff.py",
      'kwargs["resolution"] = (1 / sizes[2], 1 / sizes[1])',
      'kwargs["resolution"] = (1 / sizes[1], 1 / sizes[2])',
      ("tests/test_formats_tiff.py",)),
    M("mgh-translation-not-in-mm", "conv3d_cli/io/mgh.py",
      'affine[:3] *= UNIT_METERS[units[0]] / UNIT_METERS["millimeter"]',
      'affine[:3, :3] *= UNIT_METERS[units[0]] / UNIT_METERS["millimeter"]',
      ("tests/test_formats_mgh.py",)),
    M("hdf5-element-size-read-x-first", "conv3d_cli/io/hdf5.py",
      'return Geometry(zyx_affine(sizes), ("micrometer",) * 3, None, "affine")',
      'return Geometry(zyx_affine(sizes[::-1]), ("micrometer",) * 3, None, "affine")',
      ("tests/test_formats_hdf5.py",)),
    M("hdf5-element-size-written-x-first", "conv3d_cli/io/hdf5.py",
      "return [float(v) for v in sizes], None", "return [float(v) for v in sizes[::-1]], None",
      ("tests/test_formats_hdf5.py",)),
    # The HDF5 writer reads element_size_um from the output's geometry; the strides
    # enter it where the input's geometry is moved, once for every format.
    M("hdf5-element-size-not-scaled-by-strides", "conv3d_cli/apply.py",
      "geometry = vol.geometry.moved(job.geoms)", "geometry = vol.geometry",
      ("tests/test_formats_hdf5.py",)),
    M("analyze-scale-factor-ignored", "conv3d_cli/io/analyze.py",
      "            array = Scaled(array, slope, inter)\n", "            pass\n",
      ("tests/test_formats_mgh.py",)),
    # --- the engine's FFT lengths and method choice
    M("fft-length-7-smooth", "conv3d_cli/engine/fftsize.py",  # SciPy's complex lengths
      "    best, p5 = 2 * max(n, 1), 1\n    while p5 < best:\n",
      "    best, p5 = 2 * max(n, 1), 1\n    for p7 in (7, 49, 343, 2401):\n"
      "        best = min(best, p7 * next_fast_len(-(-n // p7))) if n > p7 else best\n"
      "    while p5 < best:\n",
      ("tests/test_choose.py",)),
    M("float16-layer-off-the-direct-path", "conv3d_cli/engine/choose.py",
      '    if job.rounds_result:\n        return ["direct"]\n', "",
      ("tests/test_choose.py", "tests/test_dtype_policy.py")),
    # --- the executors
    M("skipped-tiles-recomputed", "conv3d_cli/engine/execute.py",
      "indices = [i for i in range(len(plan.tiles)) if i not in skip]",
      "indices = list(range(len(plan.tiles)))",
      ("tests/test_distributed.py", "tests/test_file_executors.py")),
    M("returned-block-written-at-previous-tile", "conv3d_cli/engine/executors.py",
      "write_block(self.task.job, self.sink, self.plan.tiles[index], block)",
      "write_block(self.task.job, self.sink, self.plan.tiles[index - 1], block)",
      ("tests/test_executors.py", "tests/test_file_executors.py")),
    M("worker-computes-the-previous-tile", "conv3d_cli/engine/executors.py",
      "pending.add(pool.submit(run_in_worker, index, self.plan.tiles[index]))",
      "pending.add(pool.submit(run_in_worker, index, self.plan.tiles[index - 1]))",
      ("tests/test_executors.py", "tests/test_file_executors.py", "tests/test_distributed.py")),
    M("dask-key-from-address", "conv3d_cli/engine/distributed.py",
      'key=f"conv3d-tile-{token}-{index}")', 'key=f"conv3d-tile-{id(task)}-{index}")',
      ("tests/test_executors.py",)),
    # --- the CLI
    M("conv3d-workers-envvar-ignored", "conv3d_cli/cli/options.py",
      'cls=EnvOption, envvar="CONV3D_WORKERS",', "cls=EnvOption,",
      ("tests/test_envvars.py",)),
    M("input-not-completed-as-file", "conv3d_cli/cli/complete.py",
      'return [CompletionItem(incomplete, type="file")]', "return [CompletionItem(incomplete)]",
      ("tests/test_completion.py",)),
    M("progress-bars-without-terminal", "conv3d_cli/progress.py",
      "return bool(isatty and isatty())", "return True",
      ("tests/test_progress_tty.py",)),
]


def _files(root):
    """The repository's files (tracked, and untracked but not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=root, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))]


def copy_repo(dest):
    for rel in _files(ROOT):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)


def apply(mutant, root):
    """Patch the copy at ``root``; False when the old text is not there exactly once."""
    path = os.path.join(root, mutant.path)
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        text = fh.read()
    if text.count(mutant.old) != 1:
        return False
    with open(path, "w") as fh:
        fh.write(text.replace(mutant.old, mutant.new))
    return True


def run_tests(root, tests, timeout):
    """pytest in the copy, importing the copy's package (not the installed one)."""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    tail = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode, (tail[0] if tail else proc.stdout.strip().splitlines()[-1:] or [""])


def _status(code):
    """pytest's exit code as a verdict: 1 = a test failed; a crash (a signal, an
    internal error) fails the suite too; 2-5 and timeouts say nothing."""
    if code == 0:
        return "SURVIVED"
    if code == 1:
        return "killed"
    if isinstance(code, int) and (code < 0 or code == 3):
        return "crashed"
    return f"error ({code})"


def check_isolation(root):
    env = dict(os.environ, PYTHONPATH=root)
    where = subprocess.run([sys.executable, "-c", "import conv3d_cli; print(conv3d_cli.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True).stdout.strip()
    if not os.path.realpath(where).startswith(os.path.realpath(root)):
        sys.exit(f"the copy's package is not the one imported ({where}); aborting")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("words", nargs="*", help="run only mutants whose name contains one")
    parser.add_argument("--full", action="store_true", help="run the whole suite per mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutant")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.words or any(w in m.name for w in args.words)]
    if args.list:
        for m in chosen:
            print(f"{m.name:52s} {m.path}  -> {' '.join(m.tests)}")
        return 0
    bad = 0
    with tempfile.TemporaryDirectory(prefix="conv3d-mutants-") as tmp:
        pristine = os.path.join(tmp, "pristine")
        copy_repo(pristine)
        check_isolation(pristine)
        for m in chosen:
            root = os.path.join(tmp, "mutant")
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(pristine, root)
            start = time.perf_counter()
            if not apply(m, root):
                status, detail = "STALE", f"old text not found once in {m.path}"
            else:
                code, detail = run_tests(root, [] if args.full else list(m.tests), args.timeout)
                status = _status(code)
            bad += status not in ("killed", "crashed")
            detail = detail if isinstance(detail, str) else " ".join(detail)
            print(f"{status:9s} {m.name:52s} {time.perf_counter() - start:6.0f}s  {detail}",
                  flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
