"""Every reader on a few hundred truncated and bit-flipped files.

A seeded corpus (the same cases on every run): valid files of every format the
tool reads (.npy, .nii, .nii.gz, HDF5, Zarr v2/v3/OME-Zarr volumes; .npz/.npy
weights; .keras, .weights.h5 and legacy .h5 models) are cut short, have bits
flipped (anywhere, and in the first bytes where the headers are), have runs of
bytes overwritten, and, inside archives and stores, have one member or chunk
damaged while the container stays valid. Each case goes through the readers
(open_volume and a region read, the plan on its shape; load_weights;
ModelFile, every layer's shapes and weights, build_layer), and some through the
CLI. Metadata documents (Zarr, OME, Keras configs, --config files) also get valid
JSON with a hostile value put somewhere inside. Every failure must be a Conv3DError
naming the file, never another exception, never a hang.
"""

import io
import json
import os
import shutil
import signal
import zipfile
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from conv3d_cli import Conv3D
from conv3d_cli.api import build_layer, describe
from conv3d_cli.cli.main import cli
from conv3d_cli.errors import Conv3DError
from conv3d_cli.io import open_volume, write_volume
from conv3d_cli.io.keras_files import ModelFile
from conv3d_cli.weights import load_weights

zarr = pytest.importorskip("zarr", reason="zarr is part of the test extra")

MODELS = os.path.join(FIXTURES, "models")
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_data")
LIMIT = 64 << 20  # every reader is told this memory limit
SECONDS = 20      # a case taking longer is a hang


@contextmanager
def deadline(seconds, what):
    def expire(signum, frame):
        raise AssertionError(f"{what}: still running after {seconds} s (a hang?)")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ mutations
def mutants(data, rng, count):
    """``count`` damaged copies of ``data``: cut, bits flipped, bytes overwritten."""
    n = len(data)
    for i in range(count):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:  # truncated, often right inside a header
            cut = int(rng.integers(0, min(n, 1024))) if i % 8 == 0 else int(rng.integers(0, n))
            yield bytes(b[:cut])
            continue
        if kind == 1:  # a few bits anywhere
            for _ in range(int(rng.integers(1, 4))):
                k = int(rng.integers(0, n))
                b[k] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:  # a few bits in the headers
            for _ in range(int(rng.integers(1, 4))):
                k = int(rng.integers(0, min(n, 512)))
                b[k] ^= 1 << int(rng.integers(0, 8))
        else:  # a run of bytes overwritten with 0x00, 0xFF or noise
            k = int(rng.integers(0, n))
            run = int(rng.integers(1, 17))
            fill = [bytes(run), b"\xff" * run, rng.bytes(run)][i // 4 % 3]
            b[k:k + run] = fill[:len(b[k:k + run])]
        yield bytes(b)


def zip_member_mutants(path, rng, count):
    """Copies of the zip at ``path`` with one member's content damaged (valid zip)."""
    with zipfile.ZipFile(path) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    for i in range(count):
        target = i % len(members)
        damaged = next(mutants(members[target][1], rng, 4 - i % 4 if i % 4 else 4))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for j, (info, data) in enumerate(members):
                z.writestr(info.filename, damaged if j == target else data)
        yield out.getvalue()


# Values a damaged or malicious JSON document may hold where a number, list or name is due.
HOSTILE_VALUES = [None, 0, -1, 2 ** 70, -2 ** 63, 1e308, "x", "", [], {}, [1], [0, 0, 0],
                  [-1, -1, -1], [2 ** 40] * 3, True, {"a": 1}, "|O", "c8", [[1]], "relu"]


def json_mutant(doc, rng):
    """``doc`` with one value somewhere inside replaced by a hostile one (or removed)."""
    doc = json.loads(json.dumps(doc))
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return doc
        key = keys[int(rng.integers(len(keys)))]
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
            node = child
            continue
        if isinstance(node, dict) and rng.random() < 0.15:
            del node[key]
        else:
            hostile = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
            node[key] = json.loads(json.dumps(hostile))
        return doc


# --------------------------------------------------------------------- corpus
def _sources(tmp):
    """{kind: [valid files]} of small files of every format."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 7, 8)).astype(np.float32)
    write_volume(tmp / "v.npy", a)
    np.save(tmp / "f.npy", np.asfortranarray(rng.standard_normal((5, 6, 7, 2))))
    affine = np.array([[1.2, 0, 0, -3], [0, 1, 0.1, 2], [0, 0, 1.5, 1], [0, 0, 0, 1]])
    write_volume(tmp / "v.nii", a, affine=affine)
    write_volume(tmp / "v.nii.gz", a.astype(np.int16), affine=affine)
    with h5py.File(tmp / "v.h5", "w") as f:
        f.create_dataset("g/d", data=a, chunks=(3, 4, 4), compression="gzip", shuffle=True)
    with h5py.File(tmp / "c.h5", "w") as f:
        f["d"] = a
    for fmt in (2, 3):
        z = zarr.create_array(store=str(tmp / f"v{fmt}.zarr"), shape=a.shape, chunks=(4, 4, 4),
                              dtype="f4", zarr_format=fmt)
        z[...] = a
    root = zarr.open_group(store=str(tmp / "ome.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=(2,) + a.shape, chunks=(1, 4, 4, 4), dtype="f4")[...] = \
        np.stack([a, -a])
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}] + [{"name": n, "type": "space"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 2.0, 1.0, 1.0]}]}]}]
    np.save(tmp / "k.npy", rng.standard_normal((3, 3, 3, 1, 2)).astype(np.float32))
    return {
        "volume": [tmp / "v.npy", tmp / "f.npy", tmp / "v.nii", tmp / "v.nii.gz",
                   tmp / "v.h5", tmp / "c.h5", os.path.join(SAMPLE, "grid.npy"),
                   os.path.join(SAMPLE, "cells.h5")],
        "store": [tmp / "v2.zarr", tmp / "v3.zarr", tmp / "ome.zarr"],
        "weights": [os.path.join(SAMPLE, "sobel3.npz"), tmp / "k.npy"],
        "model": [os.path.join(MODELS, name) for name in
                  ("keras3.keras", "keras3.weights.h5", "keras3.h5", "keras2.h5",
                   "keras2_weights.h5")],
    }


def _cases(tmp):
    """(kind, path of a damaged copy) for the whole corpus, seeded."""
    rng = np.random.default_rng(20261123)
    out = tmp / "cases"
    out.mkdir()
    cases = []
    sources = _sources(tmp)
    per_file = {"volume": 16, "weights": 20, "model": 16}
    for kind, paths in sources.items():
        for src in paths:
            src = str(src)
            name = os.path.basename(src)
            if kind == "store":
                cases += _store_cases(src, out, rng)
                continue
            data = Path(src).read_bytes()
            blobs = list(mutants(data, rng, per_file[kind]))
            if zipfile.is_zipfile(src):
                blobs += list(zip_member_mutants(src, rng, 10))
            for i, blob in enumerate(blobs):
                path = out / f"m{len(cases)}_{i}_{name}"
                path.write_bytes(blob)
                cases.append((kind, str(path)))
    cases += _json_cases(sources, out, rng)
    return cases


def _json_cases(sources, out, rng):
    """Stores with a metadata document, and models and --config files with a layer
    config, whose JSON is valid but holds a hostile value somewhere."""
    cases = []
    for src in sources["store"]:
        src = str(src)
        names = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src)
                       for f in fs if f in ("zarr.json", ".zarray", ".zattrs", ".zgroup"))
        for i in range(8):
            store = out / f"j{i}_{os.path.basename(src)}"
            shutil.copytree(src, store)
            rel = names[i % len(names)]
            doc = json.loads((store / rel).read_text())
            (store / rel).write_text(json.dumps(json_mutant(doc, rng)))
            cases.append(("store", str(store)))
    with zipfile.ZipFile(os.path.join(MODELS, "keras3.keras")) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    for i in range(16):
        path = out / f"j{i}_model.keras"
        config = json_mutant(json.loads(members["config.json"]), rng)
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, json.dumps(config) if name == "config.json" else data)
        cases.append(("model", str(path)))
    layer = json.loads(Path(SAMPLE, "smooth.json").read_text())
    for i in range(16):
        path = out / f"j{i}_layer.json"
        path.write_text(json.dumps(json_mutant(layer, rng)))
        cases.append(("config", str(path)))
    return cases


def _store_cases(src, out, rng):
    """Copies of the Zarr store ``src`` with one file (metadata or chunk) damaged."""
    files = sorted(os.path.relpath(os.path.join(d, f), src)
                   for d, _, fs in os.walk(src) for f in fs)
    cases = []
    for i in range(16):
        rel = files[i % len(files)]
        store = out / f"s{i}_{os.path.basename(src)}"
        shutil.copytree(src, store)
        data = Path(os.path.join(src, rel)).read_bytes()
        blob = list(mutants(data, rng, 4))[i % 4] if data else b"\xff"
        (store / rel).write_bytes(blob)
        cases.append(("store", str(store)))
    return cases


# -------------------------------------------------------------------- readers
def read_volume_case(path):
    vol = open_volume(path)
    try:
        np.asarray(vol.array[tuple(slice(0, min(3, n)) for n in vol.shape)])
        describe(Conv3D(1, 1), volume=vol, workers=1, memory_limit="4G")
    finally:
        vol.close()


def read_weights_case(path):
    load_weights(path, max_bytes=LIMIT)


def read_model_case(path):
    with ModelFile(path) as model:
        names = [e.name for e in model.layers]
        for entry in model.layers:
            entry.weight_shapes()
            entry.load_weights(max_bytes=LIMIT)
    for name in names[:2]:
        build_layer(weights=path, layer_name=name, memory_limit=LIMIT,
                    layer="Conv3DTranspose" if "up" in name else None)


def read_config_case(path):
    layer = build_layer(config=path, memory_limit=LIMIT)
    describe(layer, input_shape=(1, 9, 9, 9, 1), workers=1, memory_limit="4G")


READERS = {"volume": read_volume_case, "store": read_volume_case,
           "weights": read_weights_case, "model": read_model_case,
           "config": read_config_case}


def check(kind, path):
    """None if the reader accepted the file, else the Conv3DError's message."""
    base = os.path.basename(path)
    with deadline(SECONDS, path):
        try:
            READERS[kind](path)
        except Conv3DError as exc:
            message = str(exc)
            # a layer config's sizes may be refused by the memory limit, which it names
            named = base in message or (kind == "config" and "--memory-limit" in message)
            assert named, f"{path}: the message does not name the file: {message}"
            assert "conv3d-keras-" not in message, message
            return message
        except BaseException as exc:
            raise AssertionError(f"{path}: {type(exc).__name__}: {exc}") from exc
    return None


@pytest.fixture(autouse=True)
def short_hdf5_timeout(monkeypatch):
    monkeypatch.setenv("CONV3D_HDF5_TIMEOUT", "5")  # well inside SECONDS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    return tmp, _cases(tmp)


def test_every_reader_fails_cleanly_on_damaged_files(corpus):
    _, cases = corpus
    assert len(cases) > 250
    refused = 0
    problems = []
    for kind, path in cases:
        try:
            refused += check(kind, path) is not None
        except AssertionError as exc:
            problems.append(str(exc).splitlines()[0][:300])
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems[:30])
    assert refused > len(cases) // 3  # the damage is real: most cases are refused


def test_the_cli_prints_one_line_for_damaged_files(corpus, tmp_path):
    _, cases = corpus
    seen = {}
    for kind, path in cases:
        ext = os.path.basename(path).split(".", 1)[-1]
        if seen.get(ext, 0) >= 2 or check(kind, path) is None:
            continue
        seen[ext] = seen.get(ext, 0) + 1
        base = os.path.basename(path)
        if kind in ("volume", "store"):
            args = ["run", path, str(tmp_path / f"o{len(seen)}.npy"), "--filters", "1",
                    "--kernel-size", "1", "--workers", "1"]
        elif kind == "weights":
            args = ["shape", "--input-shape", "1,8,8,8,1", "--weights", path]
        elif kind == "config":
            continue  # may be refused by the memory limit, naming it instead
        else:
            args = ["layers", path]
        with deadline(SECONDS, path):
            r = CliRunner().invoke(cli, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and base in lines[0], (args, r.output)
        assert "(run with conv3d --debug for a traceback)" not in lines[0], lines[0]
    assert len(seen) >= 8, seen
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".npy")]
