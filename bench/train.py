"""Data-pipeline overhead of training: real loop volumes/s over model-only volumes/s.

Both sides run the same optimiser steps (batch augmentation included) on the same batches;
"model only" replays batches already in memory, so the ratio is what loading costs.
"cached" is the training loop's dataset from the second epoch on: the MONAI persistent cache
on disk with its RAM tier (``train.memory_cache_mb``; 0 measures the disk cache alone);
"uncached" runs the deterministic chain from the NIfTI files every time.

    .venv/bin/python bench/train.py                 # synthetic CT, 32^3, CPU
    .venv/bin/python bench/train.py --size 128      # on a GPU: AMP switches on by itself
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from monai.data import Dataset
from torch.utils.data import DataLoader

from medml.catalog import Catalog
from medml.config import load_settings
from medml.data.dataset import cached_dataset, items_from_scans
from medml.data.splits import ensure_splits
from medml.data.transforms import deterministic_chain
from medml.ingest import ingest
from medml.models.inference import device
from medml.synth import generate
from medml.train.trainer import Trainer
from medml.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def _loop_rate(trainer: Trainer, batches, epochs: int) -> float:
    """Median volumes/s of the Trainer's own epochs over ``batches`` (after one warm-up)."""
    trainer.loader = batches
    trainer.train_epoch(0, 0)
    rates = [trainer.train_epoch(e, e)["volumes_per_s"] for e in range(1, epochs + 1)]
    return sorted(rates)[len(rates) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="network input edge (voxels)")
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side (median)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--memory-mb", type=float, default=2048.0, help="RAM tier of the cache")
    args = parser.parse_args()

    settings = load_settings(
        ROOT / "configs" / "demo.yaml",
        [
            f"preprocess.spatial_size=[{args.size}, {args.size}, {args.size}]",
            f"synth.n_patients={args.patients}",
            f"train.num_workers={args.workers}",
            f"train.memory_cache_mb={args.memory_mb}",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws").ensure()
        raw = generate(settings.synth, Path(tmp) / "raw", progress=False)
        ingest(raw.out, ws, raw.labels_csv, settings.ingest, progress=False)
        scans = ensure_splits(Catalog(ws.catalog_url), settings.split)
        trainer = Trainer(settings, ws, scans, progress=False).build()
        sampler = trainer.loader.sampler
        items = items_from_scans(ws, scans, trainer.classes)

        def loader(dataset):
            return DataLoader(
                dataset,
                batch_size=sampler.batch_size,
                sampler=sampler,
                num_workers=args.workers,
                pin_memory=device().type == "cuda",
            )

        cached = cached_dataset(ws, settings.preprocess, items, settings.train.memory_cache_mb)
        for i in range(len(cached)):  # fill the cache: the steady state from epoch 2 on
            cached[i]
        uncached = Dataset(items, deterministic_chain(settings.preprocess))
        in_memory = list(loader(cached))
        model_only = _loop_rate(trainer, in_memory, args.epochs)
        with_cache = _loop_rate(trainer, loader(cached), args.epochs)
        without_cache = _loop_rate(trainer, loader(uncached), args.epochs)

    amp = device().type == "cuda" and settings.train.amp
    print(
        f"device {device()}, input {args.size}^3, batch {sampler.batch_size}, AMP {amp}, "
        f"{len(items)} volumes, torch threads {torch.get_num_threads()}"
    )
    print(f"model only        {model_only:8.1f} volumes/s")
    print(f"loop, cached      {with_cache:8.1f} volumes/s   ratio {with_cache / model_only:.2f}")
    print(
        f"loop, uncached    {without_cache:8.1f} volumes/s   ratio {without_cache / model_only:.2f}"
    )


if __name__ == "__main__":
    main()
