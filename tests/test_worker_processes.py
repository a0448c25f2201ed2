"""Worker processes die with their parent, are capped at the CPU count, and a killed run's
temporaries are cleaned at the next start (issue 15, item 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medml.config import IngestConfig
from medml.io import atomic_path, remove_stale_temporaries
from medml.processes import cap_workers

ROOT = Path(__file__).resolve().parents[1]

# The parent: ingest's own worker pool (spawned, with ingest's initializer), two workers
# busy for a minute; it prints "ready" once both are running their task.
PARENT = """
import multiprocessing, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import pytest

from medml.config import IngestConfig
from medml.ingest.conversion import WorkerContext, init_worker
from medml.ingest.deid import KeyMaker

marks = Path(sys.argv[1])
ctx = WorkerContext(marks, marks, marks, KeyMaker(b"k"), IngestConfig())
pool = ProcessPoolExecutor(2, multiprocessing.get_context("spawn"), initializer=init_worker,
                           initargs=(ctx,))
task = (f"import os, time; open({str(marks)!r} + '/' + str(os.getpid()), 'w').close(); "
        "time.sleep(60)")
for _ in range(2):
    pool.submit(exec, task)
while len(list(marks.iterdir())) < 2:
    time.sleep(0.05)
print("ready", flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split(") ")[-1].startswith("Z"))


def test_ingest_workers_die_when_their_parent_is_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    workers: list[int] = []
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = [int(p.name) for p in tmp_path.iterdir()]
        assert len(workers) == 2 and all(map(_alive, workers))
        parent.send_signal(signal.SIGKILL)  # kill -9: nothing runs in the parent any more
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "workers outlived their killed parent"
    finally:
        for pid in workers:  # only if the test failed: do not leave them running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


def test_workers_are_capped_at_the_cpu_count():
    from medml.ingest import Ingestor

    cpus = os.cpu_count() or 1
    assert cap_workers(10_000) == cpus and cap_workers(1) == 1
    ingestor = Ingestor.__new__(Ingestor)
    ingestor.cfg = IngestConfig(workers=10_000)
    assert ingestor.workers([]) == cpus  # (predict.workers goes through the same cap_workers)


def test_temporaries_of_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "predictions.csv"
    left = tmp_path / f".predictions.csv.{dead.pid}-k1ll3d.csv"  # as atomic_path names them
    left.write_text("half a file")
    with atomic_path(out, suffix=".csv") as live:  # ours, being written now
        live.write_text("in progress")
        removed = remove_stale_temporaries(tmp_path, [out.name, "other.csv"])
        assert removed == [left] and not left.exists() and live.exists()
    assert out.read_text() == "in progress"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


FAULTS = """
import resource, sys
import nibabel as nib, numpy as np
from medml.config import PreprocessConfig
from medml.data.transforms import deterministic_chain
from medml.predict.prefetch import prepare
from medml.processes import reuse_freed_memory
import ctypes
from medml.processes import M_MMAP_THRESHOLD
# glibc's initial threshold, held fixed (its dynamic raise off): the worst case a worker meets
ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)
if sys.argv[2] == "reuse":  # must override it
    reuse_freed_memory()
rng = np.random.default_rng(0)
paths = []
for k, slices in enumerate(range(40, 80, 4)):  # scans of several sizes, as a batch holds
    vol = rng.integers(-1000, 400, (96, 96, slices)).astype(np.int16)
    paths.append(f"{sys.argv[1]}/scan{k}.nii.gz")
    nib.save(nib.Nifti1Image(vol, np.diag([3.75, 3.75, 4.3, 1.0])), paths[-1])
chain = deterministic_chain(PreprocessConfig(), load=False)
for p in paths:
    prepare(chain, p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    for p in paths:
        prepare(chain, p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_preparing_worker_reuses_freed_memory_instead_of_faulting_it_in_again(tmp_path):
    """Each preparation allocates ~2 MB of buffers (500 pages). With glibc's defaults whether
    they come back from the heap or are mapped and faulted in afresh depends on its dynamic
    mmap threshold, so on the order of earlier allocations (seen from 16 to 5400 faults for
    these 30 preparations as unrelated code changed); both runs pin the threshold where glibc
    starts, 128 KB. A worker after reuse_freed_memory() takes them from its heap."""

    def faults(mode: str) -> int:
        cmd = [sys.executable, "-c", FAULTS, str(tmp_path), mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    default, reused = faults("default"), faults("reuse")
    assert default > 1000  # faulted in afresh: seen about 135000 for 30 preparations
    assert reused * 4 < default  # seen 13-530
