"""Evaluate an encoder on the catalog: the contract's metrics in one dictionary.

- retrieval (P@1, R-precision, MAP@R) and nearest-centroid metrics on the evaluated split's
  base classes, with prototypes from the training split;
- few-shot episodes on base classes (support from the training split, queries from held-out
  patients) and, when the catalog has them, on novel classes never trained on (support and
  queries both drawn from the novel scans, never overlapping within an episode).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from medml.catalog import Catalog
from medml.config import EvaluateConfig, PreprocessConfig, Settings
from medml.evaluate.run_figures import log_figures
from medml.fewshot.rules import RuleChoice, fit_temperature, make_rule, select_rule
from medml.metrics import centroid_metrics, fewshot_episodes, retrieval_metrics
from medml.models.encoder import Encoder, load_encoder
from medml.models.inference import Embedded, embed_scans
from medml.planning import resolve
from medml.workspace import Workspace


def evaluate_encoder(
    encoder: Encoder,
    ws: Workspace,
    pp: PreprocessConfig,
    cfg: EvaluateConfig,
    split: str | None = None,
    keep: dict[str, Embedded] | None = None,
    rule: str = "centroid",
    rule_options: dict[str, float] | None = None,
    temperature: float = 0.1,
    train: Embedded | None = None,
) -> dict[str, Any]:
    """The contract's metrics for ``split``; pass ``keep={}`` to receive the embeddings too,
    ``train`` to reuse the training split's embeddings already computed.

    ``accuracy``, ``balanced_accuracy`` and ``auroc`` are those of the decision ``rule``
    (nearest centroid by default) with prototypes from the training split; ``decision_rule``
    names it.
    """
    split = split or cfg.split
    catalog = Catalog(ws.catalog_url)
    if train is None:
        train = embed_training_split(encoder, ws, pp, cfg.batch_size)
    held = embed_scans(encoder, ws, pp, catalog.list_scans(split, class_set="base"), cfg.batch_size)
    if len(held) == 0:
        raise ValueError(f"split '{split}' has no labelled scans in the catalog")
    classes = sorted(set(train.labels.tolist()))
    index = {c: i for i, c in enumerate(sorted(set(held.labels.tolist()) | set(classes)))}
    out: dict[str, Any] = {"split": split, "n": len(held)}
    out.update(retrieval_metrics(held.emb, [index[c] for c in held.labels]))
    out["decision_rule"] = rule
    out.update(
        centroid_metrics(
            train.emb,
            train.labels,
            held.emb,
            held.labels,
            classes,
            cfg.ordinal,
            temperature,
            rule,
            rule_options,
        )  # fmt: skip
    )
    episodes = (cfg.ways, cfg.shots, cfg.queries, cfg.episodes, cfg.seed)
    base = fewshot_episodes(train.emb, train.labels, held.emb, held.labels, *episodes)
    out["fewshot_base"] = {"classes": "base", "support": "train", **base}
    out["fewshot"] = out["fewshot_base"]
    novel_list = catalog.list_scans(class_set="novel")
    if novel_list:
        novel = embed_scans(encoder, ws, pp, novel_list, cfg.batch_size)
        fs = fewshot_episodes(novel.emb, novel.labels, novel.emb, novel.labels, *episodes)
        out["fewshot_novel"] = {"classes": "novel", "support": "novel", **fs}
        out["fewshot"] = out["fewshot_novel"]
    if keep is not None:
        keep.update({"train": train, split: held})
    return out


def flat_metrics(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric entries of an evaluation result as MLflow metric names."""
    flat = {f"{prefix}{k}": v for k, v in result.items() if isinstance(v, float)}
    for block in ("fewshot_base", "fewshot_novel"):
        flat.update(
            {
                f"{prefix}{block}_{k}": v
                for k, v in result.get(block, {}).items()
                if isinstance(v, float)
            }
        )
    return {k: v for k, v in flat.items() if np.isfinite(v)}


def evaluate_run(
    run_id: str, settings: Settings, ws: Workspace, checkpoint: Path, figures: bool = True
) -> dict[str, Any]:
    """Evaluate a training run's best encoder and log the metrics (and figures) to that run.

    Returns the train/evaluate JSON contract: ``run_id`` plus the metrics of
    ``settings.evaluate.split``.
    """
    settings = resolve(settings, ws)  # as training saw them
    encoder = load_encoder(settings.model, checkpoint)
    embedded: dict[str, Embedded] = {}
    train = embed_training_split(encoder, ws, settings.preprocess, settings.evaluate.batch_size)
    setup = decision_setup(encoder, settings, ws, train)
    metrics = evaluate_encoder(
        encoder, ws, settings.preprocess, settings.evaluate, keep=embedded, rule=setup.rule,
        rule_options=settings.prototypes.rule_options, temperature=setup.temperature,
        train=train,
    )  # fmt: skip
    metrics["decision_temperature"] = setup.temperature
    split = metrics["split"]
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        mlflow.log_metrics(flat_metrics(metrics, f"{split}_"))
        mlflow.set_tags(
            {"medml.decision_rule": setup.rule, "medml.decision_temperature": setup.temperature}
        )
        for name, scores in setup.scores.items():  # rule: auto, each candidate on val
            mlflow.log_metrics({f"rule_val_{name}_{k}": v for k, v in scores.items()})
        if figures:
            log_figures(settings, ws, embedded["train"], embedded[split], split)
    return {"run_id": run_id, **metrics}


def heldout_inputs(ws: Workspace, split: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Prediction inputs (volume path + scan id) of a split's labelled scans, and their labels."""
    scans = Catalog(ws.catalog_url).list_scans(split=split)
    rows = [{"path": str(ws.root / s["volume"]), "scan_id": s["scan_id"]} for s in scans]
    return rows, {s["scan_id"]: s["label"] for s in scans}


def prediction_accuracy(predictions_csv: str | Path, truth: dict[str, str]) -> float:
    """Share of prediction rows whose class equals the catalog label of their scan id."""
    preds = pd.read_csv(predictions_csv)
    hits = [truth.get(i) == p for i, p in zip(preds.scan_id, preds.predicted_class)]
    return float(np.mean(hits)) if hits else float("nan")


@dataclass(frozen=True)
class DecisionSetup:
    """How training-split prototypes decide: the rule and its temperature, fitted on val."""

    rule: str
    temperature: float
    scores: dict[str, dict[str, float]]  # validation scores of each candidate (rule: auto)


def embed_training_split(
    encoder: Encoder, ws: Workspace, pp: PreprocessConfig, batch_size: int
) -> Embedded:
    """The training split's base-class embeddings: the prototypes' support."""
    scans = Catalog(ws.catalog_url).list_scans("train", class_set="base")
    return embed_scans(encoder, ws, pp, scans, batch_size)


def decision_setup(
    encoder: Encoder, settings: Settings, ws: Workspace, train: Embedded
) -> DecisionSetup:
    """``prototypes.rule`` (with ``auto``: the candidate with the best validation accuracy)
    and its temperature (with ``prototypes.fit_temperature``: maximum likelihood on the
    validation split), for prototypes of the ``train`` embeddings; never the evaluated split."""
    pc = settings.prototypes
    if pc.rule != "auto" and not pc.fit_temperature:
        return DecisionSetup(pc.rule, pc.temperature, {})
    catalog, size, pp = Catalog(ws.catalog_url), settings.evaluate.batch_size, settings.preprocess
    val = embed_scans(encoder, ws, pp, catalog.list_scans("val", class_set="base"), size)
    if len(val) == 0 or len(set(train.labels.tolist())) < 2:
        return DecisionSetup("centroid" if pc.rule == "auto" else pc.rule, pc.temperature, {})
    choice = RuleChoice(pc.rule, {})
    if pc.rule == "auto":
        choice = select_rule(
            train.emb, train.labels, val.emb, val.labels, pc.rule_candidates, pc.temperature,
            pc.rule_options,
        )  # fmt: skip
    temperature = pc.temperature
    if pc.fit_temperature:
        rule = make_rule(choice.name, pc.temperature, **pc.rule_options)
        temperature = fit_temperature(rule.fit(train.emb, train.labels), val.emb, val.labels)
    return DecisionSetup(choice.name, temperature, choice.scores)
