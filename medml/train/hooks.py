"""Trainer hooks: what happens around the training loop, kept out of it.

A hook overrides any of the four moments of :class:`medml.train.trainer.Trainer`'s life (build
done, epoch end, checkpoint written, fit end); the trainer calls every hook in order at each
moment. MLflow logging and early stopping are hooks; so is anything a caller adds (an Optuna
pruner, weight averaging, a progress reporter), without touching the loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import yaml

from medml.config import flatten
from medml.tracking import log_params_flat

if TYPE_CHECKING:
    from medml.train.trainer import FitResult, Trainer

log = logging.getLogger(__name__)


class Hook:
    """No-op base: override the moments you need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After :meth:`Trainer.build` (and a resume), before the first epoch."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimiser step (rank 0)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """After training and validating ``epoch``; set ``trainer.should_stop`` to stop."""

    def on_checkpoint(self, trainer: Trainer, path: Path, best: bool) -> None:
        """After ``last.pt`` (or, with ``best``, ``best.pt``) was written."""

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """After the last epoch; ``result.checkpoint`` holds the best encoder."""

    def state_dict(self) -> dict[str, Any] | None:
        """What a resume needs of this hook (saved in ``last.pt``); None: nothing."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called after ``on_fit_start``)."""


class WeightAveraging(Hook):
    """An exponential moving average of the encoder's weights (and BatchNorm statistics),
    updated after every step; validation, the best checkpoint and so the packaged model use
    the average (``torch.optim.swa_utils``)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(
            trainer.encoder, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True
        )
        trainer.eval_encoder = self.ema.module

    def on_step_end(self, trainer: Trainer) -> None:
        self.ema.update_parameters(trainer.encoder)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)


class EarlyStopping(Hook):
    """Stop after ``patience`` epochs without a better validation score."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        if self.patience is not None and trainer.progress.stale_epochs >= self.patience:
            log.info("early stopping after epoch %d (best %d)", epoch, trainer.progress.best_epoch)
            trainer.should_stop = True


class MLflowLogger(Hook):
    """Params and config at the start, metrics per epoch, best-epoch metrics at the end.

    Runs inside the caller's active MLflow run (rank 0 only). ``best_val_*`` metrics are those
    of the best epoch, not the last: what a person comparing runs wants to see.
    """

    def __init__(self, resumed: bool = False) -> None:
        self.resumed = resumed
        self.best: dict[str, float] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.resumed:
            return
        dump = trainer.settings.model_dump(mode="json")
        log_params_flat(flatten(dump))
        mlflow.log_params(
            {
                "n_train": len(trainer.train_scans),
                "n_val": len(trainer.val_scans),
                "classes": ",".join(trainer.classes),
                "world_size": trainer.dist.world,
            }
        )
        mlflow.log_text(yaml.safe_dump(dump), "config.yaml")

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        finite = {k: v for k, v in metrics.items() if v == v}  # NaN: an undefined metric
        mlflow.log_metrics(finite, step=epoch)
        if trainer.progress.best_epoch == epoch:
            self.best = {k: v for k, v in finite.items() if k.startswith("val_")}

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        summary: dict[str, Any] = {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            **{f"best_{k}": v for k, v in self.best.items()},
        }
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(result.checkpoint), artifact_path="checkpoints")
