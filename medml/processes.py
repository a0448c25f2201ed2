"""Worker processes: how many, and that they die with their parent.

A ``ProcessPoolExecutor`` worker outlives a parent killed with SIGKILL (nothing runs in the
parent to stop it), and goes on writing into the workspace the next run is cleaning. Pools
pass :func:`die_with_parent` as (or call it from) their initializer: on Linux it sets
``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills the worker when its parent dies.
Elsewhere it does nothing (macOS and Windows have no such call; there a killed parent's
workers exit when they next find the pool's pipe closed).

The death signal follows the parent *thread* that started the worker: pools here are created,
used and shut down within one call, so that thread outlives its workers.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
HEAP_BLOCK_MAX = 32 << 20  # glibc's largest M_MMAP_THRESHOLD on 64-bit


def reuse_freed_memory() -> None:
    """In a process that allocates and frees the same large buffers over and over (a
    preparing worker: an inflated scan, its arrays): keep blocks up to 32 MB on the heap, and
    freed memory in the process, so the next scan reuses it. glibc's default maps each block
    over 128 KB afresh and returns it when freed, which cost a demo scan about 750 page
    faults, 1.5 ms of system time on 5 ms of work (bench/predict.py). The price is RSS that
    stays at its peak, flat however many scans come. glibc only; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * HEAP_BLOCK_MAX)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        log.debug("mallopt unavailable: default allocator settings kept")


def die_with_parent() -> None:
    """In a worker process: be killed (SIGKILL) when the parent process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid != os.getppid():  # the parent died before prctl
        os._exit(1)


def cap_workers(requested: int, what: str = "workers") -> int:
    """``requested`` processes, but never more than the machine's CPUs (more only thrash and
    multiply memory)."""
    cpus = os.cpu_count() or 1
    if requested > cpus:
        log.warning("%s: %d requested, capped at the %d CPUs", what, requested, cpus)
        return cpus
    return requested
