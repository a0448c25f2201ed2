"""The training loop: class-balanced batches, a miner and a loss, best-on-validation checkpoints."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medml.catalog import Catalog
from medml.config import Settings, SplitConfig, flatten
from medml.data.dataset import cached_dataset, items_from_scans
from medml.data.sampler import balanced_sampler
from medml.data.splits import assign_splits
from medml.data.transforms import KEY
from medml.evaluate.metrics import retrieval_metrics
from medml.evaluate.run import embed_split, evaluate_encoder, flat_metrics
from medml.fewshot.prototypes import build_prototypes
from medml.io import atomic_path
from medml.losses import build_loss
from medml.models.encoder import Encoder, build_encoder
from medml.models.inference import device, embed_dataset
from medml.predict.pyfunc import log_model
from medml.tracking import configure, log_params_flat, use_experiment
from medml.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced; ``metrics`` follows the train/evaluate JSON contract."""

    run_id: str
    model_uri: str
    checkpoint: Path
    metrics: dict[str, Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # PML's MPerClassSampler draws from numpy's global generator
    torch.manual_seed(seed)


def ensure_splits(catalog: Catalog, cfg: SplitConfig) -> list[dict[str, Any]]:
    """Assign patient-level splits when any labelled scan lacks one; return all labelled scans."""
    scans = catalog.list_scans()
    if any(s["split"] is None for s in scans):
        catalog.set_splits(assign_splits(scans, cfg))
        scans = catalog.list_scans()
    return scans


def _train_epoch(
    encoder: Encoder, loader: DataLoader, loss_fn, miner, opt, progress: bool, epoch: int
) -> tuple[float, float]:
    """One pass over the sampler; returns mean loss and volumes per second."""
    dev = device()
    encoder.train()
    losses, n_vol, start = [], 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress)
    for batch in bar:
        x, y = batch[KEY].to(dev, non_blocking=True), batch["label"].to(dev)
        emb = encoder(x)
        loss = loss_fn(emb, y, miner(emb, y)) if miner is not None else loss_fn(emb, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 5.0)
        opt.step()
        losses.append(float(loss.detach()))
        n_vol += len(y)
        bar.set_postfix(
            loss=f"{losses[-1]:.3f}", vol_s=f"{n_vol / (time.perf_counter() - start):.1f}"
        )
    return float(np.mean(losses)) if losses else float("nan"), n_vol / (time.perf_counter() - start)


def train(settings: Settings, ws: Workspace, progress: bool = True) -> TrainResult:
    """Train, keep the best epoch by validation MAP@R, evaluate it, and log everything."""
    tc = settings.train
    seed_everything(tc.seed)
    configure(ws)
    use_experiment(ws, tc.experiment)
    catalog = Catalog(ws.catalog_url)
    scans = ensure_splits(catalog, settings.split)
    train_scans = [s for s in scans if s["split"] == "train"]
    classes = sorted({s["label"] for s in train_scans})
    if len(classes) < 2:
        raise ValueError("training needs at least two labelled classes in the train split")

    train_items = items_from_scans(ws, train_scans, classes)
    train_ds = cached_dataset(ws, settings.preprocess, train_items)
    labels = [it["label"] for it in train_items]
    sampler = balanced_sampler(labels, tc.m_per_class, tc.batch_size)
    loader = DataLoader(
        train_ds,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=tc.num_workers,
        pin_memory=device().type == "cuda",
    )

    encoder = build_encoder(settings.model).to(device())
    loss_fn, miner = build_loss(settings.loss, len(classes), settings.model.embedding_dim)
    opt = torch.optim.AdamW(encoder.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)

    with mlflow.start_run() as run:
        run_id = run.info.run_id
        ckpt = ws.checkpoints / run_id / "best.pt"
        log_params_flat(flatten(settings.model_dump(mode="json")))
        mlflow.log_params({"n_train": len(train_items), "classes": ",".join(classes)})
        mlflow.log_text(yaml.safe_dump(settings.model_dump(mode="json")), "config.yaml")
        best = -1.0
        for epoch in range(1, tc.epochs + 1):
            loss, vps = _train_epoch(encoder, loader, loss_fn, miner, opt, progress, epoch)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            val_emb, val_lab = embed_split(
                encoder, ws, settings.preprocess, "val", classes, settings.evaluate.batch_size
            )
            val = retrieval_metrics(
                val_emb, [classes.index(c) if c in classes else -1 for c in val_lab]
            )
            mlflow.log_metrics(
                {
                    "train_loss": loss,
                    "lr": lr,
                    "volumes_per_s": vps,
                    **{f"val_{k}": v for k, v in val.items()},
                },
                step=epoch,
            )
            score = val["mean_average_precision_at_r"]
            log.info("epoch %d loss %.4f val MAP@R %.3f (%.1f vol/s)", epoch, loss, score, vps)
            if not np.isfinite(score) or score > best:
                best = score if np.isfinite(score) else best
                with atomic_path(ckpt, suffix=".pt") as tmp:
                    torch.save(encoder.state_dict(), tmp)
        encoder.load_state_dict(torch.load(ckpt, map_location=device(), weights_only=True))
        mlflow.log_artifact(str(ckpt), artifact_path="checkpoints")

        metrics = evaluate_encoder(encoder, ws, settings.preprocess, settings.evaluate)
        mlflow.log_metrics(flat_metrics(metrics, f"{metrics['split']}_"))
        emb, _ = embed_dataset(encoder, train_ds, settings.evaluate.batch_size)
        protos = build_prototypes(
            emb,
            [classes[i] for i in labels],
            settings.prototypes.temperature,
            settings.prototypes.unknown_threshold,
        )
        info = log_model(encoder, protos, settings)
    return TrainResult(run_id, info.model_uri, ckpt, {"run_id": run_id, **metrics})
