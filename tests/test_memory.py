"""The memory limit holds on a volume larger than the limit, measured in a subprocess."""

import json
import subprocess
import sys

import numpy as np

from conftest import assert_close

# VmHWM, the peak RSS of this process's own memory (ru_maxrss would carry over
# the pytest parent's peak through fork and exec).
SCRIPT = """
import sys
from conv3d_cli.cli.main import cli
try:
    cli(sys.argv[1:], standalone_mode=False)
finally:
    with open("/proc/self/status") as fh:
        print([int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:")][0])
"""


def test_peak_rss_stays_under_memory_limit(tmp_path):
    shape = (288, 512, 512)  # 288 MiB of float32, larger than the 256 MiB limit
    src = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=shape)
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], 32):
        src[z:z + 32] = rng.standard_normal((32,) + shape[1:], dtype=np.float32)
    src.flush()
    limit = 256 << 20
    args = ["run", str(tmp_path / "big.npy"), str(tmp_path / "out.npy"), "--filters", "1",
            "--kernel-size", "3", "--kernel-initializer", "ones", "--workers", "1",
            "--memory-limit", str(limit), "--report", str(tmp_path / "r.json"), "-q"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.strip().splitlines()[-1])
    assert src.nbytes > limit
    assert peak <= limit, f"peak RSS {peak / 2**20:.0f} MiB over the {limit / 2**20:.0f} MiB limit"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tiles"] > 1
    out = np.load(tmp_path / "out.npy", mmap_mode="r")
    z = 140  # a plane in the middle: the sum of the 3x3x3 neighbourhood
    expected = sum(np.asarray(src[z + a, b:b + 510, c:c + 510], np.float64)
                   for a in range(3) for b in range(3) for c in range(3))
    assert_close(out[z], expected)
