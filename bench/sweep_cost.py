"""What one sweep trial costs, and the full sweep extrapolated against the 60-minute goal.

Runs one fold fit as the loss comparison runs it (``medml.train.train`` on fold 1 of K of
train+val, as ``medml.sweep.jobs.run_fit`` calls it) on an ingested workspace with 1 torch
thread, times each epoch in CPU seconds of this process (robust on a shared machine) and
prints the extrapolated CPU time of ``losses x folds x trials`` fold fits plus the final fits,
and its ratio to the goal with ``--workers`` cores.

    .venv/bin/python bench/sweep_cost.py --config configs/demo.yaml --workspace WS --epochs 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medml.catalog import Catalog
from medml.config import load_settings
from medml.data.splits import ensure_splits
from medml.sweep.folds import make_folds, pick
from medml.train import train
from medml.train.hooks import Hook
from medml.workspace import Workspace


class Clock(Hook):
    """CPU and wall seconds of every epoch, and of the whole fit."""

    def on_fit_start(self, trainer):
        self.cpu, self.wall, self.epochs = time.process_time(), time.perf_counter(), []

    def on_epoch_end(self, trainer, epoch, metrics):
        cpu, wall = time.process_time(), time.perf_counter()
        self.epochs.append({"epoch": epoch, "cpu_s": cpu - self.cpu, "wall_s": wall - self.wall})
        self.cpu, self.wall = cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the measured fit")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--losses", type=int, default=4)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trial-epochs", type=int, default=20, help="sweep.epochs extrapolated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--goal-min", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = load_settings(
        args.config, [f"train.epochs={args.epochs}", "train.experiment=bench-sweep-cost"]
    )
    ws = Workspace(Path(args.workspace))
    catalog = Catalog(ws.catalog_url)
    ensure_splits(catalog, settings.split)
    pool = [s for s in catalog.list_scans(class_set="base") if s["split"] in ("train", "val")]
    fold = make_folds(pool, args.folds, 0)[0]
    clock = Clock()
    start = time.process_time()
    train(settings, ws, progress=False, run_name="bench sweep cost",
          train_scans=pick(pool, fold.train_ids), val_scans=pick(pool, fold.val_ids),
          hooks=[clock])  # fmt: skip
    total = time.process_time() - start
    steady = [e["cpu_s"] for e in clock.epochs[1:]] or [clock.epochs[0]["cpu_s"]]
    per_epoch = sum(steady) / len(steady)
    overhead = max(0.0, total - sum(e["cpu_s"] for e in clock.epochs))
    fold_fit = args.trial_epochs * per_epoch + overhead
    refit = args.trial_epochs * per_epoch * len(pool) / len(fold.train_ids) + overhead
    cpu_min = (args.losses * args.folds * args.trials * fold_fit
               + args.losses * args.seeds * refit) / 60  # fmt: skip
    wall_min = cpu_min / args.workers
    print(json.dumps({
        "n_train": len(fold.train_ids), "n_val": len(fold.val_ids),
        "cpu_s_per_epoch": round(per_epoch, 2),
        "first_epoch_cpu_s": round(clock.epochs[0]["cpu_s"], 2),
        "fit_overhead_cpu_s": round(overhead, 2),
        "sweep_cpu_min_unpruned": round(cpu_min, 1), "sweep_wall_min_unpruned": round(wall_min, 1),
        "ratio_to_goal": round(wall_min / args.goal_min, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
