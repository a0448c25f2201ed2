"""The Trainer: class-balanced batches, a loss (and miner), best-on-validation checkpoints.

It only trains: evaluation on test, prototypes and model packaging are separate library
functions (``medml.evaluate``, ``medml.registry.package``). What happens around the loop
(MLflow logging, early stopping, pruning, weight averaging) is a :class:`~medml.train.hooks.Hook`.

Determinism: data order and augmentation are reseeded from (seed, epoch) at the start of every
epoch, so a resume after a kill reproduces an uninterrupted run on CPU. Under ``torchrun``
every rank trains on its own class-balanced stream; rank 0 validates, checkpoints and calls
the hooks.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from medml import progress
from medml.config import Settings
from medml.data.augment import BatchAugment
from medml.data.dataset import cached_dataset, items_from_scans
from medml.data.sampler import balanced_sampler
from medml.data.transforms import KEY
from medml.losses import LossBundle, build_loss
from medml.metrics import retrieval_metrics
from medml.models.encoder import Encoder, build_encoder
from medml.models.inference import device, embed_scans
from medml.train import checkpoint
from medml.train.distributed import Dist
from medml.train.hooks import Hook
from medml.train.pretrain import load_initial_weights
from medml.train.schedule import warmup_cosine
from medml.workspace import Workspace

log = logging.getLogger(__name__)

# The validation score that picks the best epoch.
SELECTION_METRIC = "val_mean_average_precision_at_r"


@dataclass
class FitResult:
    """What a fit produced: the best epoch's encoder weights and how it got there."""

    run_id: str
    checkpoint: Path  # encoder state dict of the best epoch
    best_epoch: int
    best_score: float
    epochs_run: int
    classes: list[str]
    history: list[dict[str, float]] = field(default_factory=list)


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


class Trainer:
    """Trains an encoder on ``train_scans``, choosing the best epoch on ``val_scans``.

    Without validation scans every epoch counts as the best so far (the last one is kept):
    how a final model is refitted on train+val once the epochs were chosen by
    cross-validation.
    """

    def __init__(
        self,
        settings: Settings,
        ws: Workspace,
        train_scans: Sequence[dict[str, Any]],
        val_scans: Sequence[dict[str, Any]] = (),
        hooks: Sequence[Hook] = (),
        progress: bool = True,
        dist: Dist | None = None,
        checkpoint_dir: Path | None = None,
    ) -> None:
        self.settings, self.ws = settings, ws
        self.train_scans, self.val_scans = list(train_scans), list(val_scans)
        self.hooks = list(hooks)
        self.progress_bar = progress
        self.dist = dist or Dist()
        self.checkpoint_dir = checkpoint_dir or ws.checkpoints / "run"
        self.classes = sorted({s["label"] for s in self.train_scans})
        if len(self.classes) < 2:
            raise ValueError("training needs at least two labelled classes in the train split")
        self.progress = checkpoint.Progress()
        self.should_stop = False
        self.run_id = ""
        self.history: list[dict[str, float]] = []
        self._hook_states: dict[str, Any] = {}

    # ------------------------------------------------------------------------------- build

    def build(self) -> Trainer:
        """Data loader, encoder, loss (+ miner), optimiser, schedule and grad scaler."""
        tc, dev = self.settings.train, device()
        items = items_from_scans(self.ws, self.train_scans, self.classes)
        dataset = cached_dataset(self.ws, self.settings.preprocess, items, tc.memory_cache_mb)
        labels = [it["label"] for it in items]
        sampler = balanced_sampler(labels, tc.m_per_class, tc.batch_size, shards=self.dist.world)
        self.loader = DataLoader(
            dataset,
            batch_size=sampler.batch_size,
            sampler=sampler,
            num_workers=tc.num_workers,
            pin_memory=dev.type == "cuda",
            persistent_workers=tc.num_workers > 0,  # workers keep their RAM cache across epochs
        )
        seed_everything(tc.seed)
        self.encoder = build_encoder(self.settings.model)
        if self.settings.model.init_from:
            load_initial_weights(self.encoder, self.settings.model.init_from)
        bundle = build_loss(
            self.settings.loss, len(self.classes), self.settings.model.embedding_dim
        )
        self.model = MetricModel(self.encoder, bundle).to(dev)
        groups = [{"params": self.encoder.parameters(), "lr": tc.lr}]
        if bundle.has_parameters:  # class weights / proxies learn at their own rate, no decay
            groups.append({"params": bundle.loss.parameters(), "lr": tc.loss_lr, "weight_decay": 0})
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        steps = len(self.loader)
        self.scheduler = warmup_cosine(self.optimizer, tc.warmup_epochs * steps, tc.epochs * steps)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp)
        self.step_model = DistributedDataParallel(self.model) if self.dist.enabled else self.model
        self.augment = BatchAugment(self.settings.augment)
        self.eval_encoder = self.encoder  # what validation and best.pt use (hooks may swap it)
        return self

    @property
    def amp(self) -> bool:
        return self.settings.train.amp and device().type == "cuda"

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a ``last.pt`` payload (see :mod:`medml.train.checkpoint`)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.progress = checkpoint.Progress(**saved["progress"])
        self.run_id = saved["run_id"]
        self._hook_states = saved.get("hooks", {})
        log.info("resuming run %s after epoch %d", self.run_id, self.progress.epoch)

    # ------------------------------------------------------------------------------- steps

    def train_step(self, batch: dict[str, Any], gen: torch.Generator) -> float:
        """One optimiser step on one batch; returns the loss."""
        dev = device()
        x = batch[KEY].to(dev, non_blocking=True)
        y = batch["label"].to(dev, non_blocking=True)
        x = self.augment(x, gen)
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=self.amp):
            loss = self.step_model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.dist.main:
            for hook in self.hooks:
                hook.on_step_end(self)
        return float(loss.detach())

    def train_epoch(self, epoch: int, seed: int) -> dict[str, float]:
        """One pass over the sampler: mean loss, volumes per second (all ranks), lr."""
        gen = torch.Generator().manual_seed(seed)
        self.model.train()
        losses, n_vol, start = [], 0, time.perf_counter()
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        with progress.Progress(
            total, f"epoch {epoch}", self.progress_bar, unit="batch", leave=False
        ) as bar:
            for batch in self.loader:
                losses.append(self.train_step(batch, gen))
                n_vol += len(batch["label"])
                vps = n_vol / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", vol_s=f"{vps:.1f}")
                bar.update(1)
        seconds = time.perf_counter() - start
        return {
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "volumes_per_s": n_vol * self.dist.world / seconds if seconds > 0 else float("nan"),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }

    def validate(self) -> dict[str, float]:
        """Retrieval metrics of the validation scans among themselves (``val_`` prefixed)."""
        if not self.val_scans:
            return {}
        val = embed_scans(
            self.eval_encoder, self.ws, self.settings.preprocess, self.val_scans,
            self.settings.evaluate.batch_size,
        )  # fmt: skip
        index = {c: i for i, c in enumerate(sorted(set(val.labels.tolist()) | set(self.classes)))}
        scores = retrieval_metrics(val.emb, [index[c] for c in val.labels])
        return {f"val_{k}": v for k, v in scores.items()}

    # ------------------------------------------------------------------------------- fit

    def fit(self) -> FitResult:
        """Epochs from where the progress counters stand to ``train.epochs`` (or a stop)."""
        if self.dist.main:
            for hook in self.hooks:
                hook.on_fit_start(self)
            for hook in self.hooks:  # a resumed run's hook states (weight averages, ...)
                state = self._hook_states.get(type(hook).__name__)
                if state is not None:
                    hook.load_state_dict(state)
        for epoch in range(self.progress.epoch + 1, self.settings.train.epochs + 1):
            epoch_seed = self.settings.train.seed * 1000 + epoch * 10 + self.dist.rank
            seed_everything(epoch_seed)
            metrics = self.train_epoch(epoch, epoch_seed)
            if self.dist.main:
                self.end_epoch(epoch, metrics)
            if self.dist.broadcast_flag(self.should_stop):
                break
        result = FitResult(
            self.run_id, self.checkpoint_dir / "best.pt", self.progress.best_epoch,
            self.progress.best_score, self.progress.epoch, self.classes, self.history,
        )  # fmt: skip
        if self.dist.main:
            for hook in self.hooks:
                hook.on_fit_end(self, result)
        return result

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Validate, keep the best encoder, write ``last.pt``, call the hooks."""
        metrics = {**metrics, **self.validate()}
        self.history.append({"epoch": epoch, **metrics})
        score = metrics.get(SELECTION_METRIC, float("nan"))
        log.info(
            "epoch %d loss %.4f val MAP@R %.3f (%.1f vol/s)",
            epoch, metrics["train_loss"], score, metrics["volumes_per_s"],
        )  # fmt: skip
        state = self.progress
        state.epoch = epoch
        improved = np.isfinite(score) and score > state.best_score
        if improved or state.best_epoch == 0 or not self.val_scans:
            state.best_score = score if np.isfinite(score) else state.best_score
            state.best_epoch, state.stale_epochs = epoch, 0
            self._save_best()
        else:
            state.stale_epochs += 1
        for hook in self.hooks:
            hook.on_epoch_end(self, epoch, metrics)
        state.finished = self.should_stop or epoch == self.settings.train.epochs
        self._save_last()

    def _save_best(self) -> None:
        path = self.checkpoint_dir / "best.pt"
        checkpoint.save(path, self.eval_encoder.state_dict())
        for hook in self.hooks:
            hook.on_checkpoint(self, path, best=True)

    def _save_last(self) -> None:
        path = self.checkpoint_dir / "last.pt"
        states = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "hooks": {type(h).__name__: s for h in self.hooks if (s := h.state_dict()) is not None},
        }
        checkpoint.save_last(path, self.run_id, self.progress, states)
        for hook in self.hooks:
            hook.on_checkpoint(self, path, best=False)
