"""A fair comparison of losses (as in Musgrave et al., "A Metric Learning Reality Check").

Every loss trains with the same data, splits, seeds, backbone, embedding size and epoch
budget, as child runs of one MLflow parent run, so the MLflow UI's compare view shows them side
by side. The comparison table (mean ± 95 % CI over seeds) is saved as CSV and markdown.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from medml.config import Settings
from medml.evaluate.run import evaluate_run
from medml.io import atomic_write_text
from medml.lock import writes_workspace
from medml.tracking import configure, use_experiment
from medml.train import train
from medml.workspace import Workspace

log = logging.getLogger(__name__)

TABLE_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "kappa_quadratic",
    "fewshot_accuracy",
)


@dataclass
class SweepResult:
    parent_run_id: str
    table_csv: Path
    table_md: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def settings_for(settings: Settings, loss: str, seed: int) -> Settings:
    """The shared settings with one loss and one seed; margins/scales default per loss unless
    the sweep runs the configured loss itself."""
    loss_cfg = settings.loss.model_copy(update={"name": loss})
    if loss != settings.loss.name:
        loss_cfg = loss_cfg.model_copy(
            update={
                "margin": None,
                "scale": None,
                "temperature": None,
                "miner": None,
                "options": {},
            }
        )
    return settings.model_copy(
        update={"loss": loss_cfg, "train": settings.train.model_copy(update={"seed": seed})}
    )


def _row(loss: str, seed: int, run_id: str, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"loss": loss, "seed": seed, "run_id": run_id}
    row.update({k: metrics.get(k) for k in TABLE_METRICS if k in metrics})
    row["fewshot_accuracy"] = metrics.get("fewshot", {}).get("accuracy")
    return row


def summarise(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One line per loss: mean and 95 % CI half-width (1.96 s / sqrt(n)) of each metric."""
    frame = pd.DataFrame(rows)
    out = []
    for loss, group in frame.groupby("loss", sort=False):
        line: dict[str, Any] = {"loss": loss, "seeds": len(group)}
        for metric in TABLE_METRICS:
            if metric not in group:
                continue
            values = group[metric].astype(float).dropna().to_numpy()
            if len(values) == 0:
                continue
            line[metric] = float(values.mean())
            line[f"{metric}_ci95"] = (
                float(1.96 * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
            )
        out.append(line)
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame) -> str:
    metrics = [m for m in TABLE_METRICS if m in table]
    lines = ["| loss | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for _, r in table.iterrows():
        cells = [
            f"{r[m]:.3f} ± {r[f'{m}_ci95']:.3f}" if r["seeds"] > 1 else f"{r[m]:.3f}"
            for m in metrics
        ]
        lines.append(f"| {r['loss']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@writes_workspace("sweep")
def sweep(
    settings: Settings, ws: Workspace, losses: list[str], seeds: int = 1, progress: bool = False
) -> SweepResult:
    """Train each loss for each of ``seeds`` seeds under one parent run; return the table."""
    configure(ws)
    use_experiment(ws, settings.train.experiment)
    rows: list[dict[str, Any]] = []
    with mlflow.start_run(run_name="sweep " + ",".join(losses)) as parent:
        pid = parent.info.run_id
        mlflow.log_params(
            {
                "losses": ",".join(losses),
                "seeds": seeds,
                "model.backbone": settings.model.backbone,
                "model.embedding_dim": settings.model.embedding_dim,
                "train.epochs": settings.train.epochs,
            }
        )
        for loss in losses:
            for i in range(seeds):
                seed = settings.train.seed + i
                log.info("sweep: %s, seed %d", loss, seed)
                one = settings_for(settings, loss, seed)
                fitted = train(
                    one,
                    ws,
                    progress,
                    run_name=f"{loss} seed {seed}",
                    nested=True,
                    tags={"medml.sweep": pid, "medml.loss": loss},
                )
                metrics = evaluate_run(fitted.run_id, one, ws, fitted.checkpoint)
                rows.append(_row(loss, seed, fitted.run_id, metrics))
        table = summarise(rows)
        csv_path = ws.reports / f"sweep-{pid}.csv"
        md_path = ws.reports / f"sweep-{pid}.md"
        atomic_write_text(csv_path, table.to_csv(index=False))
        atomic_write_text(md_path, to_markdown(table))
        mlflow.log_artifact(str(csv_path), artifact_path="comparison")
        mlflow.log_artifact(str(md_path), artifact_path="comparison")
        with tempfile.TemporaryDirectory() as tmp:  # every seed's row, for reanalysis
            per_run = Path(tmp) / "runs.csv"
            pd.DataFrame(rows).to_csv(per_run, index=False)
            mlflow.log_artifact(str(per_run), artifact_path="comparison")
        for _, r in table.iterrows():
            mlflow.log_metrics(
                {
                    f"{r['loss']}.{m}": float(r[m])
                    for m in TABLE_METRICS
                    if m in r and pd.notna(r[m])
                }
            )
    return SweepResult(pid, csv_path, md_path, rows)
