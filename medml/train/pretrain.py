"""Self-supervised pretraining of the encoder on unlabelled scans (SimCLR, Chen et al. 2020).

Every catalog scan outside the test split (labelled or not: labels are never read) is seen
twice per step, each view augmented independently; the NT-Xent loss (pytorch-metric-learning's
``NTXentLoss``) pulls the two views of a scan together and pushes the other scans of the batch
away. The encoder (backbone + head, as ``model`` configures it) is saved in an MLflow run;
``train`` starts from it with ``model.init_from: runs:/RUN_ID``.

Test scans are left out by default (``pretrain.include_test``): no label is read, but a
reported test metric should not come from an encoder that has seen the test images.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader

from medml.catalog import Catalog
from medml.config import Settings, flatten
from medml.data.augment import BatchAugment
from medml.data.dataset import cached_dataset, items_from_scans
from medml.data.transforms import KEY
from medml.lock import writes_workspace
from medml.models.encoder import Encoder, build_encoder, load_matching
from medml.models.inference import device
from medml.planning import resolve
from medml.progress import track
from medml.tracking import configure, log_params_flat, use_experiment
from medml.train import checkpoint
from medml.workspace import Workspace

log = logging.getLogger(__name__)
ARTIFACT = "encoder/encoder.pt"


@dataclass
class PretrainResult:
    run_id: str
    checkpoint: Path  # encoder state dict
    losses: list[float] = field(default_factory=list)  # mean NT-Xent per epoch


def pretraining_scans(catalog: Catalog, include_test: bool) -> list[dict]:
    """Every scan of the catalog (labels unused), the test split's only when asked."""
    scans = catalog.list_scans(labelled=False)
    return [s for s in scans if include_test or s.get("split") != "test"]


def nt_xent_step(
    encoder: Encoder, loss_fn, x: torch.Tensor, augment: BatchAugment, gen: torch.Generator
) -> torch.Tensor:
    """The NT-Xent loss of one batch: two augmented views per scan, a scan's views positives."""
    views = torch.cat([augment(x, gen), augment(x, gen)])
    ids = torch.arange(len(x), device=x.device).repeat(2)
    return loss_fn(encoder(views).float(), ids)


@writes_workspace("pretrain")
def pretrain(settings: Settings, ws: Workspace, progress: bool = True) -> PretrainResult:
    """Contrastive pretraining in an MLflow run of ``train.experiment``; the encoder's path."""
    from pytorch_metric_learning.losses import NTXentLoss

    settings = resolve(settings, ws)  # the workspace's plans fill what the config left unset
    pc, dev = settings.pretrain, device()
    scans = pretraining_scans(Catalog(ws.catalog_url), pc.include_test)
    if len(scans) < 2:
        raise ValueError("the catalog is empty: run `medml ingest` (or `medml pipeline`) first")
    items = items_from_scans(ws, scans, [])
    dataset = cached_dataset(ws, settings.preprocess, items, settings.train.memory_cache_mb)
    batch = min(pc.batch_size, len(dataset))
    gen = torch.Generator().manual_seed(pc.seed)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, generator=gen)
    torch.manual_seed(pc.seed)
    encoder = build_encoder(settings.model).to(dev)
    loss_fn = NTXentLoss(temperature=pc.temperature)
    opt = torch.optim.AdamW(encoder.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    augment = BatchAugment(pc.augment)
    configure(ws)
    use_experiment(ws, settings.train.experiment)
    result = PretrainResult("", ws.checkpoints / "pretrain" / "encoder.pt")
    with mlflow.start_run(run_name="pretrain · nt-xent", tags={"medml.step": "pretrain"}) as run:
        result.run_id = run.info.run_id
        log_params_flat(
            {f"pretrain.{k}": v for k, v in flatten(pc.model_dump(mode="json")).items()}
        )
        log_params_flat(flatten({"model": settings.model.model_dump(mode="json")}))
        mlflow.log_params({"n_scans": len(scans)})
        for epoch in range(1, pc.epochs + 1):
            encoder.train()
            losses = []
            batches = track(loader, f"pretrain {epoch}", None, progress, "batch", leave=False)
            for b in batches:
                loss = nt_xent_step(encoder, loss_fn, b[KEY].to(dev), augment, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            result.losses.append(float(np.mean(losses)))
            mlflow.log_metric("pretrain_loss", result.losses[-1], step=epoch)
            log.info("pretrain epoch %d NT-Xent %.4f", epoch, result.losses[-1])
        result.checkpoint = ws.checkpoints / result.run_id / "encoder.pt"
        checkpoint.save(result.checkpoint, encoder.state_dict())
        mlflow.log_artifact(str(result.checkpoint), artifact_path="encoder")
    return result


def load_initial_weights(encoder: Encoder, init_from: str) -> int:
    """Load a pretrained encoder (``runs:/RUN_ID`` of :func:`pretrain`, or a local state dict)
    into ``encoder`` where names and shapes match; the number of tensors loaded."""
    if init_from.startswith("runs:/"):
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"{init_from.rstrip('/')}/{ARTIFACT}"
            path = mlflow.artifacts.download_artifacts(uri, dst_path=tmp)
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = torch.load(init_from, map_location="cpu", weights_only=True)
    return load_matching(encoder, state, init_from)
