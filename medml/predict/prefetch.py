"""Read and preprocess prediction inputs ahead of the model, in worker processes.

Reading a scan (gzip, DICOM decoding) and the MONAI chain (resampling above all) cost several
times the forward pass of a small 3D encoder, so batch inference keeps worker processes busy
preparing the next batches while the current one is embedded. Results come back in input
order, and about ``ahead`` inputs per worker are in flight beyond the batch being embedded,
so memory stays flat however many scans come. Processes, not threads: much of the work is
Python and MONAI glue that holds the GIL (measured on 2 cores with the demo's model: 50
scans/s in one process, 68 with two threads, 81 with two worker processes). Workers are
spawned, so a script that predicts with workers needs the usual ``if __name__ == "__main__":``;
they die with the predicting process (``medml.processes.die_with_parent``), and there are at
most as many as CPUs.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from medml.config import IngestConfig, PreprocessConfig
from medml.data.transforms import KEY, deterministic_chain
from medml.ingest.checks import SeriesChecks
from medml.models.inference import embed_volumes
from medml.predict.inputs import DOES_NOT_EXIST, describe_error
from medml.predict.loading import load_input
from medml.processes import cap_workers, die_with_parent, reuse_freed_memory

# (volume or None, content scan id or None, error message or None) for one input
Prepared = tuple[np.ndarray | None, str | None, str | None]
Batch = tuple[list[torch.Tensor | None], list[str | None], list[str | None]]
# (embeddings, a NaN row where an input failed; content scan ids; error messages) of a batch
EmbeddedBatch = tuple[np.ndarray, list[str | None], list[str | None]]

_CHAIN: Any = None
_CHECKS: SeriesChecks | None = None
_ENCODER: torch.nn.Module | None = None
_DIM = 0


def prepare(chain: Any, path: str, checks: SeriesChecks | None = None) -> Prepared:
    """One input through reading (``checks``: the ingestion's series checks, so prediction
    refuses what ingestion refuses) and ``chain``; an unreadable input becomes an error
    message (scrubbed of paths and header values: it reaches logs and Prefect artifacts)."""
    if not os.path.lexists(path):
        return None, None, DOES_NOT_EXIST
    try:
        tensor, scan_id = load_input(path, checks)
        volume = torch.as_tensor(chain({KEY: tensor})[KEY]).as_subclass(torch.Tensor)
        return volume.numpy(), scan_id, None
    except Exception as exc:  # one bad input must not sink the batch
        return None, None, describe_error(exc, path)


def _init(
    cfg: PreprocessConfig,
    checks: SeriesChecks | None,
    encoder: torch.nn.Module | None = None,
    dim: int = 0,
) -> None:
    global _CHAIN, _CHECKS, _ENCODER, _DIM
    die_with_parent()  # a killed predict takes its workers with it
    reuse_freed_memory()  # every scan allocates what the last one freed
    torch.set_num_threads(1)  # one core per worker; the pool is the parallelism
    _CHAIN = deterministic_chain(cfg, load=False)
    _CHECKS = checks
    _ENCODER, _DIM = (encoder.eval() if encoder is not None else None), dim


def _prepare_in_worker(path: str) -> Prepared:
    return prepare(_CHAIN, path, _CHECKS)


def _embed_in_worker(paths: list[str]) -> EmbeddedBatch:
    vols, ids, errors = as_batch(prepare(_CHAIN, p, _CHECKS) for p in paths)
    return embed_volumes(_ENCODER, vols, _DIM), ids, errors


def as_batch(prepared: Iterable[Prepared]) -> Batch:
    """Per-input results as the (volumes, ids, errors) lists the model takes."""
    vols, ids, errors = [], [], []
    for volume, scan_id, error in prepared:
        vols.append(None if volume is None else torch.from_numpy(volume))
        ids.append(scan_id)
        errors.append(error)
    return vols, ids, errors


def auto_workers(n_inputs: int, workers: int | None, min_inputs: int) -> int:
    """``workers`` if set (at most one per CPU), else one per CPU when there are at least
    ``min_inputs`` inputs (a pool costs a few seconds to start), else 0 (in this process)."""
    if workers is not None:
        return cap_workers(workers, "predict.workers")
    return (os.cpu_count() or 1) if n_inputs >= min_inputs else 0


class Prefetcher:
    """Prepares batches of paths in ``workers`` processes (0 or 1: here, one at a time).

    Use as a context manager; :meth:`map` yields one :data:`Batch` per list of paths, in order.
    Given an ``encoder`` (on the CPU) and its embedding size ``dim``, :meth:`embed_map` yields
    each batch embedded by the workers themselves: only embeddings cross between processes, and
    the predicting process, which would otherwise run every forward pass while the workers
    prepare, is left the decisions and the output (on 2 cores: 300 against 245 demo scans/s).
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        workers: int,
        ahead: int = 2,
        ingest: IngestConfig | None = None,
        encoder: torch.nn.Module | None = None,
        dim: int = 0,
    ) -> None:
        self.cfg, self.workers, self.ahead = cfg, workers, ahead
        self.checks = SeriesChecks.from_config(ingest or IngestConfig())
        self.encoder, self.dim = encoder, dim
        self.pool: ProcessPoolExecutor | None = None
        self.chain = None

    def __enter__(self) -> Prefetcher:
        if self.workers > 1:  # spawn: fork is unsafe in threaded callers (Prefect, MLflow)
            self.pool = ProcessPoolExecutor(
                self.workers,
                multiprocessing.get_context("spawn"),
                initializer=_init,
                initargs=(self.cfg, self.checks, self.encoder, self.dim),
            )
        else:
            self.chain = deterministic_chain(self.cfg, load=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, batches: Iterable[list[str]]) -> Iterator[Batch]:
        """The prepared batches, in order, with ``ahead`` inputs per worker being prepared."""
        if self.pool is None:
            for paths in batches:
                yield as_batch(prepare(self.chain, p, self.checks) for p in paths)
            return
        pending: deque[list[Future[Prepared]]] = deque()
        queued = self.ahead * self.workers  # inputs kept in flight beyond the next batch
        in_flight = 0
        for paths in batches:
            # one job per input, so a batch is prepared by all workers at once
            pending.append([self._submit(_prepare_in_worker, p) for p in paths])
            in_flight += len(paths)
            while len(pending) > 1 and in_flight - len(pending[0]) >= queued:
                in_flight -= len(pending[0])
                yield self._collect(pending.popleft())
        while pending:
            yield self._collect(pending.popleft())

    def embed_map(self, batches: Iterable[list[str]]) -> Iterator[EmbeddedBatch]:
        """Each list of paths prepared and embedded by the ``encoder``, in order: in the
        workers one batch per job, ``ahead`` batches per worker in flight (memory stays flat:
        a job returns embeddings, not volumes); without a pool, here."""
        if self.encoder is None:
            raise ValueError("embed_map needs the Prefetcher's encoder")
        if self.pool is None:
            for paths in batches:
                vols, ids, errors = as_batch(prepare(self.chain, p, self.checks) for p in paths)
                yield embed_volumes(self.encoder, vols, self.dim), ids, errors
            return
        pending: deque[tuple[int, Future[EmbeddedBatch]]] = deque()
        for paths in batches:
            pending.append((len(paths), self._submit(_embed_in_worker, paths)))
            if len(pending) > self.ahead * self.workers:
                yield self._embedded(*pending.popleft())
        while pending:
            yield self._embedded(*pending.popleft())

    def _submit(self, fn: Any, arg: Any) -> Future:
        """``fn(arg)`` in the pool; once a worker has died the pool takes no more work, and
        every later job fails as the lost ones did, instead of stopping the whole run."""
        assert self.pool is not None
        try:
            return self.pool.submit(fn, arg)
        except BrokenProcessPool as exc:
            failed: Future = Future()
            failed.set_exception(exc)
            return failed

    def _embedded(self, n: int, future: Future[EmbeddedBatch]) -> EmbeddedBatch:
        try:
            return future.result()
        except BrokenProcessPool as exc:  # a worker died (out of memory, killed): batch fails
            error = f"worker died: {type(exc).__name__}"
            return np.full((n, self.dim), np.nan, np.float32), [None] * n, [error] * n

    @staticmethod
    def _collect(futures: list[Future[Prepared]]) -> Batch:
        prepared: list[Prepared] = []
        for fut in futures:
            try:
                prepared.append(fut.result())
            except Exception as exc:  # a worker died (out of memory, killed)
                prepared.append((None, None, f"worker died: {type(exc).__name__}"))
        return as_batch(prepared)
