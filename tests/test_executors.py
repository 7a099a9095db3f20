"""Executors: worker processes however they start, runs side by side in one
process, a killed or unreachable worker, compiled kernels made once, Dask keys."""

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import assert_close
from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file
from conv3d_cli.errors import ArgumentError, EngineError
from reference import conv3d as ref_conv3d

START_METHODS = [m for m in ("fork", "forkserver", "spawn")
                 if m in multiprocessing.get_all_start_methods()]


def _volume(tmp_path, rng, name="in.npy", shape=(2, 10, 9, 8, 2)):
    a = rng.standard_normal(shape).astype(np.float32)
    np.save(tmp_path / name, a)
    return a


def _expected(layer, a):
    return ref_conv3d(a, layer.kernel, layer.bias, padding=layer.padding)


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("out", ["out.npy", "out.h5:/y"])
def test_workers_started_each_way_compute_the_same(tmp_path, rng, monkeypatch, method, out):
    """A tiny job over files on two worker processes started by ``method``: the
    .npy output takes the workers' own writes, the HDF5 one gets their blocks
    back (one writer)."""
    monkeypatch.setenv("CONV3D_START_METHOD", method)
    a = _volume(tmp_path, rng)
    layer = Conv3D(3, 3, padding="same", activation="tanh", bias_initializer="random_normal")
    layer.build(a.shape)
    report = apply_to_file(layer, str(tmp_path / "in.npy"), f"{tmp_path}/{out}", workers=2,
                           chunk_shape=(5, 5, 8), progress=False)
    assert report["workers"] == 2 and report["tiles"] == 8, report
    if out.endswith(".npy"):
        y = np.load(tmp_path / out)
    else:
        import h5py
        with h5py.File(tmp_path / "out.h5") as f:
            y = f["y"][...]
    expected = np.tanh(_expected(layer, a))
    assert_close(y, expected)
    assert multiprocessing.active_children() == []


def test_two_runs_at_once_in_one_process_do_not_interfere(tmp_path, rng):
    """Two runs over files in two threads of one process, each with its own
    worker processes, at the same time: each output is its own layer's result."""
    runs = []
    for i, (filters, size) in enumerate([(2, 3), (3, 2)]):
        a = _volume(tmp_path, rng, f"in{i}.npy", shape=(1, 12, 10, 9, 1 + i))
        layer = Conv3D(filters, size, padding="same", bias_initializer="random_normal")
        layer.build(a.shape)
        runs.append((layer, a))
    together = threading.Barrier(2, timeout=60)
    errors = []

    def run(i):
        layer, _ = runs[i]
        try:
            apply_to_file(layer, str(tmp_path / f"in{i}.npy"), str(tmp_path / f"out{i}.npy"),
                          workers=2, chunk_shape=(3, 5, 9), progress=False,
                          on_plan=lambda info: together.wait())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (layer, a) in enumerate(runs):
        assert_close(np.load(tmp_path / f"out{i}.npy"), _expected(layer, a))


def _dies_in_a_worker(x):
    """An activation that kills the worker process computing it (module-level:
    it pickles by name, so it reaches workers however they start)."""
    if multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_killed_worker_ends_the_run_with_one_error_and_no_process_left(
        tmp_path, rng, monkeypatch, method):
    monkeypatch.setenv("CONV3D_START_METHOD", method)
    _volume(tmp_path, rng, shape=(16, 16, 16))
    layer = Conv3D(1, 3, activation=_dies_in_a_worker)
    with pytest.raises(EngineError, match="worker process died"):
        apply_to_file(layer, str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), workers=2,
                      chunk_shape=(4, 4, 4), progress=False)
    assert multiprocessing.active_children() == []
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_job_workers_cannot_receive_is_refused_in_one_line(tmp_path, rng, monkeypatch,
                                                             method):
    """A lambda activation cannot be pickled for workers that are not forked
    from this process: the run says so, before starting any."""
    monkeypatch.setenv("CONV3D_START_METHOD", method)
    _volume(tmp_path, rng, shape=(10, 10, 10))
    layer = Conv3D(1, 3, activation=lambda x: x)
    with pytest.raises(ArgumentError, match=f"cannot be sent to worker processes started "
                                            f"by {method}.*--workers 1"):
        apply_to_file(layer, str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), workers=2,
                      chunk_shape=(4, 4, 4), progress=False)
    assert multiprocessing.active_children() == []
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]


def test_compiled_kernels_are_made_once_not_once_per_worker(tmp_path, rng):
    """A fresh numba cache and forked workers: the stencil is compiled (and
    saved to the cache) once, in the parent, before the workers start."""
    np.save(tmp_path / "in.npy", rng.standard_normal((64, 64, 64)).astype(np.float32))
    env = dict(os.environ, CONV3D_START_METHOD="fork", NUMBA_CACHE_DIR=str(tmp_path / "nc"),
               NUMBA_DEBUG_CACHE="1")
    cli = os.path.join(os.path.dirname(sys.executable), "conv3d")
    r = subprocess.run([cli, "run", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"),
                        "--filters", "2", "--kernel-size", "3", "--workers", "2",
                        "--chunk-shape", "32,32,64", "--method", "direct", "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saved = re.findall(r"\[cache\] data saved to .*stencil", r.stdout + r.stderr)
    assert len(saved) == 1, r.stdout + r.stderr


def test_dask_keys_come_from_the_job_not_its_address():
    """Equal jobs get equal tokens (a retried or resubmitted run finds its
    keys); a change of weights or activation gives another token."""
    tokenize = pytest.importorskip("dask.base").tokenize

    def job(seed, activation=None):
        layer = Conv3D(2, 3, activation=activation, kernel_initializer="glorot_uniform")
        layer.build((1, 8, 8, 8, 1))
        layer.set_weights([np.random.default_rng(seed).standard_normal(layer.kernel.shape)
                           .astype(np.float32), np.zeros(2, np.float32)])
        return layer.job((1, 8, 8, 8, 1))

    assert tokenize(job(0)) == tokenize(job(0))
    assert tokenize(job(0)) != tokenize(job(1))
    assert tokenize(job(0)) != tokenize(job(0, "relu"))


class _FakeCluster:
    """Stands in for a Dask client and ``distributed``'s ``as_completed``: runs
    each submitted task at once, here, and records what was sent."""

    def __init__(self, threads=2):
        self.threads = threads
        self.scattered = []
        self.sent = []       # per task: the arguments besides the scattered objects, and key
        self.waiting = 0     # submitted, not yet taken from as_completed
        self.most_waiting = 0
        self.client = self   # the `distributed` module's namespace, for _run

    def scheduler_info(self):
        return {"workers": {"w": {"nthreads": self.threads}}}

    def scatter(self, objects, broadcast=False, hash=True):
        self.scattered.append(objects)
        return [("scattered", i) for i in range(len(objects))]

    def submit(self, fn, task_f, plan_f, *args, key, retries, pure):
        assert (task_f, plan_f) == (("scattered", 0), ("scattered", 1))
        task, plan = self.scattered[-1]
        self.sent.append((args, key))
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        return _Done(fn(task, plan, *args))

    def as_completed(self):
        return _Queue(self)

    def cancel(self, futures):
        pass

    FutureCancelledError = RuntimeError


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Queue:
    def __init__(self, cluster):
        self.cluster, self.items = cluster, []

    def add(self, fut):
        self.items.append(fut)

    def __iter__(self):
        while self.items:
            self.cluster.waiting -= 1
            yield self.items.pop(0)


def _dask_run(spatial, chunk, seed=0):
    """A run of a small layer over an in-memory volume through the Dask executor's
    task loop on a fake cluster: (cluster, output, expected)."""
    from conv3d_cli.engine import plan_job
    from conv3d_cli.engine.distributed import _run
    from conv3d_cli.engine.task import TileTask
    from conv3d_cli.layout import CanonicalView, Layout
    layer = Conv3D(2, 3, padding="same")
    shape = (1, *spatial, 1)
    layer.build(shape)
    weights = np.random.default_rng(seed)
    layer.set_weights([weights.standard_normal(layer.kernel.shape).astype(np.float32),
                       weights.standard_normal(2).astype(np.float32)])
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    job = layer.job(shape)
    plan = plan_job(job, "direct", workers=1, chunk_shape=chunk)
    y = np.zeros(job.out_canonical_shape, np.float32)
    task = TileTask(job, plan.method, CanonicalView(x, Layout(x.shape, "channels_last")),
                    CanonicalView(y, Layout(y.shape, "channels_last")))
    cluster = _FakeCluster()
    done = []
    _run(cluster, cluster, task, plan, range(len(plan.tiles)), lambda i, s: done.append(i), 1)
    assert sorted(done) == list(range(len(plan.tiles)))
    return cluster, y, _expected(layer, x)


def test_dask_tasks_carry_a_tile_range_and_stay_few_in_flight():
    """The task and the plan are scattered once; each Dask task sends the range
    of tile indices it computes only, under a key made from the job's token;
    small tiles are grouped, several tasks per cluster thread; at most
    IN_FLIGHT per cluster thread wait at a time, however many tiles the plan has."""
    import pickle

    from conv3d_cli.engine import distributed
    few, y, expected = _dask_run((8, 8, 8), (4, 4, 4))
    assert_close(y, expected)
    many, y, expected = _dask_run((16, 16, 16), (1, 1, 2))
    assert_close(y, expected)
    # 8 tiles on 2 threads: one per task; 2048 two-voxel tiles: 16 tasks of 128.
    assert len(few.sent) == 8 and len(many.sent) == 2 * distributed.TASKS_PER_THREAD
    for cluster, tiles in ((few, 8), (many, 2048)):
        assert len(cluster.scattered) == 1
        assert all(len(args) == 1 and isinstance(args[0], range) for args, _ in cluster.sent)
        assert sorted(i for args, _ in cluster.sent for i in args[0]) == list(range(tiles))
        assert cluster.most_waiting <= distributed.IN_FLIGHT * cluster.threads
    payload = [max(len(pickle.dumps(sent)) for sent in c.sent) for c in (few, many)]
    assert payload[1] <= payload[0] + 16 and payload[1] < 200, payload
    # The same job gets the same keys again; another kernel, other keys.
    again, _, _ = _dask_run((8, 8, 8), (4, 4, 4))
    other, _, _ = _dask_run((8, 8, 8), (4, 4, 4), seed=1)
    assert [k for _, k in again.sent] == [k for _, k in few.sent]
    assert not {k for _, k in other.sent} & {k for _, k in few.sent}
