"""The training loop: class-balanced batches, a loss (and miner), best-on-validation checkpoints.

Determinism: data order and augmentation are reseeded from (seed, epoch) at the start of every
epoch, so ``--resume`` after a kill reproduces an uninterrupted run on CPU.
"""

from __future__ import annotations

import contextlib
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medml.catalog import Catalog
from medml.config import Settings, SplitConfig, flatten
from medml.data.augment import BatchAugment
from medml.data.dataset import cached_dataset, items_from_scans
from medml.data.sampler import balanced_sampler
from medml.data.splits import assign_splits
from medml.data.transforms import KEY
from medml.evaluate.metrics import retrieval_metrics
from medml.evaluate.run import Embedded, base_scans, embed_split, evaluate_encoder, flat_metrics
from medml.fewshot.prototypes import build_prototypes
from medml.losses import LossBundle, build_loss
from medml.models.encoder import Encoder, build_encoder
from medml.models.inference import device
from medml.predict.pyfunc import log_model
from medml.tracking import configure, log_params_flat, use_experiment
from medml.train import checkpoint
from medml.train.distributed import Dist
from medml.train.figures import log_figures
from medml.train.schedule import warmup_cosine
from medml.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced; ``metrics`` follows the train/evaluate JSON contract."""

    run_id: str
    model_uri: str
    checkpoint: Path
    metrics: dict[str, Any]


class MetricModel(nn.Module):
    """Encoder + loss as one module, so DDP also averages the loss's parameters' gradients."""

    def __init__(self, encoder: Encoder, bundle: LossBundle) -> None:
        super().__init__()
        self.encoder, self.loss, self.miner = encoder, bundle.loss, bundle.miner

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.encoder(x).float()
        if self.miner is not None:
            return self.loss(emb, y, self.miner(emb, y))
        return self.loss(emb, y)


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
    model: nn.Module,
    loader: DataLoader,
    opt,
    sched,
    scaler,
    settings: Settings,
    progress: bool,
    epoch: int,
    seed: int = 0,
) -> tuple[float, float]:
    """One pass over the sampler; returns mean loss and volumes per second."""
    dev = device()
    amp = settings.train.amp and dev.type == "cuda"
    augment, gen = BatchAugment(settings.augment), torch.Generator().manual_seed(seed)
    model.train()
    losses, n_vol, start = [], 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress)
    for batch in bar:
        x, y = batch[KEY].to(dev, non_blocking=True), batch["label"].to(dev, non_blocking=True)
        x = augment(x, gen)
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.train.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(float(loss.detach()))
        n_vol += len(y)
        bar.set_postfix(
            loss=f"{losses[-1]:.3f}", vol_s=f"{n_vol / (time.perf_counter() - start):.1f}"
        )
    return float(np.mean(losses)) if losses else float("nan"), n_vol / (time.perf_counter() - start)


def _validate(encoder: Encoder, ws: Workspace, settings: Settings, classes: list[str]) -> dict:
    val = embed_split(encoder, ws, settings.preprocess, "val", settings.evaluate.batch_size)
    index = {c: i for i, c in enumerate(sorted(set(val.labels.tolist()) | set(classes)))}
    return retrieval_metrics(val.emb, [index[c] for c in val.labels])


def train(
    settings: Settings,
    ws: Workspace,
    progress: bool = True,
    resume: Path | None = None,
    run_name: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train, keep the best epoch by validation MAP@R, evaluate it, and log everything.

    ``resume`` is a ``last.pt`` to continue from (its MLflow run continues too). Under
    ``torchrun`` every rank trains on its own class-balanced stream; rank 0 validates, logs and
    writes checkpoints.
    """
    tc, dev, dist = settings.train, device(), Dist.from_env()
    catalog = Catalog(ws.catalog_url)
    if dist.main:  # one writer for MLflow and the catalog
        configure(ws)
        use_experiment(ws, tc.experiment)
        ensure_splits(catalog, settings.split)
    dist.barrier()
    train_scans = base_scans(catalog, "train")
    classes = sorted({s["label"] for s in train_scans})
    if len(classes) < 2:
        raise ValueError("training needs at least two labelled classes in the train split")

    items = items_from_scans(ws, train_scans, classes)
    train_ds = cached_dataset(ws, settings.preprocess, items, tc.memory_cache_mb)
    labels = [it["label"] for it in items]
    sampler = balanced_sampler(labels, tc.m_per_class, tc.batch_size, shards=dist.world)
    loader = DataLoader(
        train_ds,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=tc.num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=tc.num_workers > 0,  # workers keep their RAM cache across epochs
    )

    seed_everything(tc.seed)
    encoder = build_encoder(settings.model)
    bundle = build_loss(settings.loss, len(classes), settings.model.embedding_dim)
    model = MetricModel(encoder, bundle).to(dev)
    groups = [{"params": encoder.parameters(), "lr": tc.lr}]
    if bundle.has_parameters:  # class weights / proxies learn at their own rate, no decay
        groups.append({"params": bundle.loss.parameters(), "lr": tc.loss_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    steps = len(loader)
    sched = warmup_cosine(opt, tc.warmup_epochs * steps, tc.epochs * steps)
    scaler = torch.amp.GradScaler(dev.type, enabled=tc.amp and dev.type == "cuda")
    state, run_id = checkpoint.Progress(), None
    if resume is not None:
        saved = checkpoint.load(resume)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state, run_id = checkpoint.Progress(**saved["progress"]), saved["run_id"]
        log.info("resuming run %s after epoch %d", run_id, state.epoch)
    step_model = DistributedDataParallel(model) if dist.enabled else model

    run_ctx = (
        mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested, tags=tags)
        if dist.main
        else contextlib.nullcontext()
    )
    with run_ctx as run:
        run_id = run.info.run_id if dist.main else ""
        ckpt_dir = ws.checkpoints / (run_id or "rank")
        if dist.main and resume is None:
            log_params_flat(flatten(settings.model_dump(mode="json")))
            mlflow.log_params(
                {"n_train": len(items), "classes": ",".join(classes), "world_size": dist.world}
            )
            mlflow.log_text(yaml.safe_dump(settings.model_dump(mode="json")), "config.yaml")
        for epoch in range(state.epoch + 1, tc.epochs + 1):
            epoch_seed = tc.seed * 1000 + epoch * 10 + dist.rank
            seed_everything(epoch_seed)
            loss, vps = _train_epoch(
                step_model, loader, opt, sched, scaler, settings, progress, epoch, epoch_seed
            )
            stop = False
            if dist.main:
                stop = _end_epoch(
                    epoch,
                    loss,
                    vps * dist.world,
                    model,
                    opt,
                    sched,
                    scaler,
                    state,
                    settings,
                    ws,
                    classes,
                    run_id,
                    ckpt_dir,
                )
            if dist.broadcast_flag(stop):
                break
        if not dist.main:
            dist.close()
            return TrainResult("", "", Path(), {})
        result = _finish(model.encoder, settings, ws, classes, run_id, ckpt_dir, state)
    dist.close()
    return result


def _end_epoch(
    epoch: int,
    loss: float,
    vps: float,
    model: MetricModel,
    opt,
    sched,
    scaler,
    state: checkpoint.Progress,
    settings: Settings,
    ws: Workspace,
    classes: list[str],
    run_id: str,
    ckpt_dir: Path,
) -> bool:
    """Validate, log, checkpoint; return True when early stopping says stop."""
    val = _validate(model.encoder, ws, settings, classes)
    lr = opt.param_groups[0]["lr"]
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
    state.epoch = epoch
    if np.isfinite(score) and score > state.best_score or state.best_epoch == 0:
        state.best_score = score if np.isfinite(score) else state.best_score
        state.best_epoch, state.stale_epochs = epoch, 0
        checkpoint.save(ckpt_dir / "best.pt", model.encoder.state_dict())
    else:
        state.stale_epochs += 1
    patience = settings.train.early_stopping_patience
    stop = patience is not None and state.stale_epochs >= patience
    state.finished = stop or epoch == settings.train.epochs
    checkpoint.save_last(
        ckpt_dir / "last.pt",
        run_id,
        state,
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
        },
    )
    if stop:
        log.info("early stopping after epoch %d (best %d)", epoch, state.best_epoch)
    return stop


def _finish(
    encoder: Encoder,
    settings: Settings,
    ws: Workspace,
    classes: list[str],
    run_id: str,
    ckpt_dir: Path,
    state: checkpoint.Progress,
) -> TrainResult:
    """Best epoch -> test metrics, figures, training-split prototypes, logged pyfunc model."""
    best = ckpt_dir / "best.pt"
    encoder.load_state_dict(checkpoint.load(best))
    mlflow.log_artifact(str(best), artifact_path="checkpoints")
    mlflow.log_metrics({"best_epoch": state.best_epoch, "epochs_run": state.epoch})
    embedded: dict[str, Embedded] = {}
    metrics = evaluate_encoder(encoder, ws, settings.preprocess, settings.evaluate, keep=embedded)
    mlflow.log_metrics(flat_metrics(metrics, f"{metrics['split']}_"))
    train_emb = embedded["train"]
    protos = build_prototypes(
        train_emb.emb,
        train_emb.labels,
        settings.prototypes.temperature,
        settings.prototypes.unknown_threshold,
    )
    log_figures(encoder, settings, ws, protos, embedded[metrics["split"]], metrics["split"])
    info = log_model(encoder, protos, settings)
    return TrainResult(run_id, info.model_uri, best, {"run_id": run_id, **metrics})
