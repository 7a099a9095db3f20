"""Start-up cost of the `conv3d` commands, as a ratio to `python -c "import numpy, click"`.

    python benchmarks/startup.py [--runs N] [--markdown]

A shell tool is called thousands of times from Makefiles and shell completion,
so what a command costs before it does anything matters. Each command runs N
times (after one untimed run that fills the page cache and the numba cache),
in interleaved rounds so that a change in the machine's load hits every
command alike. Its cost is the median CPU time (user + system, of the process
and its children: what ``/usr/bin/time -f "%U %S"`` reports) and the median
peak resident size (``%M``); the ratio divides the CPU time by the baseline's,
measured in the same rounds. The goals: 1.5x the baseline for
everything but ``run``, 3x for a warm 8^3 ``run``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRAIN = os.path.join(ROOT, "sample_data", "brain.nii.gz")
COMPLETION = {"_CONV3D_COMPLETE": "bash_complete", "COMP_WORDS": "conv3d ru", "COMP_CWORD": "1"}
BASELINE = 'python -c "import numpy, click"'
RUNS = 10
TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None  # GNU time


def commands(tmp):
    """(label, argv, extra environment, goal ratio or None); the first is the baseline."""
    conv3d = os.path.join(os.path.dirname(sys.executable), "conv3d")
    npy, out = os.path.join(tmp, "x.npy"), os.path.join(tmp, "y.npy")
    layer = ["--filters", "1", "--kernel-size", "3"]
    return [
        (BASELINE, [sys.executable, "-c", "import numpy, click"], {}, None),
        ("conv3d --help", [conv3d, "--help"], {}, 1.5),
        ("conv3d --version", [conv3d, "--version"], {}, 1.5),
        ("conv3d info brain.nii.gz", [conv3d, "info", BRAIN], {}, 1.5),
        ("conv3d info x.npy", [conv3d, "info", npy], {}, 1.5),
        ("conv3d shape --input-shape 1,8,8,8,1",
         [conv3d, "shape", "--input-shape", "1,8,8,8,1", *layer], {}, 1.5),
        ("conv3d shape brain.nii.gz", [conv3d, "shape", BRAIN, *layer], {}, 1.5),
        ("completion of 'conv3d ru'", [conv3d], COMPLETION, 1.5),
        ("conv3d run 8^3 .npy (warm)",
         [conv3d, "run", npy, out, *layer, "--seed", "0", "--overwrite", "-q"], {}, 3.0),
    ]


def write_input(tmp):
    """An 8^3 float32 volume, written with the .npy format's own header (no NumPy needed)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (8, 8, 8), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    with open(os.path.join(tmp, "x.npy"), "wb") as fh:
        fh.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        fh.write(bytes(4 * 8 ** 3))


def measure(argv, env):
    """(CPU seconds, peak resident MiB or None) of one run of ``argv`` and its children.

    The CPU time is ``wait4``'s (microseconds; ``/usr/bin/time`` prints
    hundredths). The peak resident size is ``/usr/bin/time``'s, where it
    exists: a child forked from this process would inherit this process's
    peak (Linux keeps it across exec), so it is measured from a small
    process, whose own CPU time (about a millisecond) the baseline pays too.
    Python may write bytecode caches (an installed package has them; without,
    every run would compile the package's modules from source again).
    """
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        timed = [TIME, "-q", "-f", "%M", "-o", out.name, *argv] if TIME else argv
        proc = subprocess.Popen(timed, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        err = proc.stderr.read()
        proc.stderr.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.decode()}")
        kib = out.read().split()[-1] if TIME else None
    return usage.ru_utime + usage.ru_stime, None if kib is None else int(kib) / 1024


def measure_all(runs):
    """[(label, median CPU s, median peak MiB, goal)]; the first row is the baseline."""
    with tempfile.TemporaryDirectory(prefix="conv3d-startup-") as tmp:
        write_input(tmp)
        table = commands(tmp)
        for _, argv, env, _ in table:
            measure(argv, env)  # warm: page cache, .pyc files, the numba cache
        cpu = [[] for _ in table]
        rss = [[] for _ in table]
        for _ in range(runs):
            for i, (_, argv, env, _) in enumerate(table):
                seconds, mib = measure(argv, env)
                cpu[i].append(seconds)
                rss[i].append(mib)
    return [(label, statistics.median(c), None if None in r else statistics.median(r), goal)
            for (label, _, _, goal), c, r in zip(table, cpu, rss)]


def report(rows, runs, markdown=False):
    base = rows[0][1]
    head = ("command", "CPU s", "ratio", "goal", "peak MiB")
    lines = [f"start-up: median of {runs} runs each, CPU time (user + sys) / the baseline's"]
    body = []
    for label, seconds, mib, goal in rows:
        ratio = seconds / base
        verdict = "" if goal is None else f"<= {goal:g}: {'met' if ratio <= goal else 'NOT met'}"
        body.append((label, f"{seconds:.3f}", f"{ratio:.2f}", verdict,
                     "-" if mib is None else f"{mib:.0f}"))
    if markdown:
        lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                  for row in (head, *body)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=RUNS, help="timed runs of each command")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    print(report(measure_all(args.runs), args.runs, args.markdown))


if __name__ == "__main__":
    main()
