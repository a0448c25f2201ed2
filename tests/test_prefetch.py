"""Inputs prepared ahead of the model in worker processes: the same batches, in order."""

from __future__ import annotations

import os

import torch

from medml.predict.prefetch import Prefetcher, auto_workers


def test_worker_processes_prepare_the_same_batches_in_order(ingested, tiny_settings, tmp_path):
    volumes = sorted(str(p) for p in ingested.volumes.glob("*.nii.gz"))[:5]
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a NIfTI file")
    batches = [
        [volumes[0], volumes[1], str(garbage)],
        [volumes[2]],
        [],
        [volumes[3], volumes[4], str(tmp_path / "missing.nii.gz")],
    ]
    results = {}
    for workers in (0, 2):
        with Prefetcher(tiny_settings.preprocess, workers, ahead=1) as prefetch:
            results[workers] = list(prefetch.map(batches))
    assert [len(b[0]) for b in results[2]] == [3, 1, 0, 3]
    for (vols_a, ids_a, err_a), (vols_b, ids_b, err_b) in zip(results[0], results[2]):
        assert ids_a == ids_b and err_a == err_b
        for a, b in zip(vols_a, vols_b):
            assert (a is None and b is None) or torch.equal(a, b)
    vols, ids, errors = results[2][0]
    assert vols[0].shape == (1, *tiny_settings.preprocess.spatial_size) and ids[0]
    assert vols[2] is None and ids[2] is None and errors[2]
    assert str(tmp_path) not in errors[2]  # error texts name no path (they reach logs)
    assert results[2][3][2][2] == "does not exist"


def test_workers_start_only_for_enough_inputs():
    assert auto_workers(10, None, min_inputs=64) == 0
    assert auto_workers(100, None, min_inputs=64) >= 1
    assert auto_workers(100, 3, min_inputs=64) == min(3, os.cpu_count() or 1)  # capped
    assert auto_workers(100, 10_000, min_inputs=64) == (os.cpu_count() or 1)
    assert auto_workers(10, 0, min_inputs=64) == 0


def test_workers_that_embed_give_the_embeddings_of_the_same_batches(
    ingested, tiny_settings, tmp_path
):
    """embed_map: each batch prepared and embedded in a worker equals preparing it in the
    predicting process and embedding it there; failed inputs are NaN rows with their error."""
    import numpy as np

    from medml.models.encoder import build_encoder
    from medml.models.inference import embed_volumes

    torch.manual_seed(0)
    encoder = build_encoder(tiny_settings.model).eval()
    dim = tiny_settings.model.embedding_dim
    volumes = sorted(str(p) for p in ingested.volumes.glob("*.nii.gz"))[:4]
    batches = [[volumes[0], str(tmp_path / "missing.nii.gz"), volumes[1]], [], volumes[2:]]
    with Prefetcher(tiny_settings.preprocess, 0) as here:
        expected = [(embed_volumes(encoder, v, dim), i, e) for v, i, e in here.map(batches)]
    with Prefetcher(tiny_settings.preprocess, 2, ahead=1, encoder=encoder, dim=dim) as pool:
        got = list(pool.embed_map(batches))
    assert [len(g[0]) for g in got] == [3, 0, 2]
    for (emb_a, ids_a, err_a), (emb_b, ids_b, err_b) in zip(expected, got):
        assert ids_a == ids_b and err_a == err_b
        np.testing.assert_allclose(emb_a, emb_b, rtol=1e-5, atol=1e-6)
    assert np.isnan(got[0][0][1]).all() and got[0][2][1] == "does not exist"
    assert not np.isnan(got[0][0][[0, 2]]).any()


def test_a_killed_worker_fails_its_inputs_and_the_rest_goes_on(ingested, tiny_settings):
    """A worker killed (out of memory, by an operator) breaks the pool: the inputs it held and
    every later one come back as "worker died" errors, in order, instead of ending the run."""
    import signal
    import time

    from medml.models.encoder import build_encoder

    encoder = build_encoder(tiny_settings.model).eval()
    dim = tiny_settings.model.embedding_dim
    volumes = sorted(str(p) for p in ingested.volumes.glob("*.nii.gz"))[:2]
    batches = [volumes] * 6
    for embed in (False, True):
        with Prefetcher(tiny_settings.preprocess, 2, ahead=1, encoder=encoder, dim=dim) as pool:
            results = pool.embed_map(batches) if embed else pool.map(batches)
            errors = []
            for k, (_, _, errs) in enumerate(results):
                errors.append(errs)
                if k == 0:
                    os.kill(next(iter(pool.pool._processes)), signal.SIGKILL)
                    deadline = time.monotonic() + 20  # until the pool has seen the death
                    while not pool.pool._broken and time.monotonic() < deadline:
                        time.sleep(0.05)
        assert len(errors) == 6 and errors[0] == [None, None]
        assert errors[-1] == ["worker died: BrokenProcessPool"] * 2
