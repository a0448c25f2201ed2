"""Register a model version with new prototypes from a support set; no retraining needed."""

from __future__ import annotations

import csv
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from medml.catalog import Catalog
from medml.config import PrototypeConfig, Settings
from medml.fewshot.calibration import calibrate, save_curve_figure
from medml.fewshot.prototypes import build_prototypes, select_support
from medml.fewshot.rules import select_rule
from medml.ingest.nifti import is_nifti_name
from medml.io import atomic_path
from medml.lock import writes_workspace
from medml.predict.pyfunc import MedmlModel, load_medml_model, thumbnails
from medml.registry.package import log_model
from medml.tracking import use_experiment
from medml.workspace import Workspace


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str
    model_uri: str
    run_id: str
    classes: list[str]


def read_support(support: str | Path) -> list[tuple[str, str]]:
    """``(path, label)`` pairs from a CSV (columns ``path``, ``label``) or one folder per class."""
    support = Path(support)
    if support.is_file():
        with support.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and not {"path", "label"} <= set(rows[0]):
            raise ValueError(f"{support}: support CSV needs 'path' and 'label' columns")
        base = support.parent
        return [(str((base / r["path"]).resolve()), r["label"]) for r in rows]
    if support.is_dir():
        pairs = []
        for class_dir in sorted(p for p in support.iterdir() if p.is_dir()):
            for item in sorted(class_dir.iterdir()):
                if is_nifti_name(item) or item.is_dir():
                    pairs.append((str(item), class_dir.name))
        return pairs
    raise FileNotFoundError(f"support set not found: {support}")


def embed_labelled(
    model: MedmlModel, pairs: list[tuple[str, str]], what: str, thumbs: bool = False
) -> tuple[np.ndarray, list[str], list[str], np.ndarray | None]:
    """Embed ``(path, label)`` pairs in batches; fail naming every unreadable file.

    Returns embeddings, labels, content scan ids and (optionally) middle-slice thumbnails.
    """
    size = model.settings.predict.batch_size
    embs, ids, pics, bad = [], [], [], []
    for i in range(0, len(pairs), size):
        paths = [p for p, _ in pairs[i : i + size]]
        vols, chunk_ids, errors = model.preprocess_paths(paths)
        bad += [f"{p}: {e}" for p, e in zip(paths, errors) if e]
        embs.append(model.embed_volumes(vols))
        ids += [s or "" for s in chunk_ids]
        if thumbs:
            pics += [thumbnails(v) for v in vols if v is not None]
    if bad:
        raise ValueError(f"unreadable {what} scans:\n" + "\n".join(bad))
    if not pairs:
        raise ValueError(f"the {what} set is empty")
    return np.concatenate(embs), [lab for _, lab in pairs], ids, np.stack(pics) if thumbs else None


@writes_workspace("prototypes", arg="workspace")
def register_prototypes(
    model_uri: str,
    support: list[tuple[str, str]],
    name: str,
    alias: str | None = "champion",
    temperature: float | None = None,
    unknown_threshold: float | None = None,
    validation: list[tuple[str, str]] | None = None,
    target_far: float | None = None,
    workspace: Workspace | None = None,
) -> Registered:
    """Embed the support scans with the model's encoder and register encoder + new prototypes.

    With ``validation`` pairs, the temperature is fitted on them (minimum NLL) and, for the
    target false-accept rate (argument, else config), the 'unknown' threshold; the curve goes
    to the MLflow run as ``calibration/open_set_curve.{csv,png}``. Explicit ``temperature`` /
    ``unknown_threshold`` arguments win over fitted and configured values. With ``workspace``,
    the run goes to the model's training experiment (artifacts in the workspace).
    """
    model = load_medml_model(model_uri)
    pcfg = model.settings.prototypes
    if workspace is not None:
        use_experiment(workspace, model.settings.train.experiment)
    emb, labels, ids, thumbs = embed_labelled(model, support, "support", thumbs=True)
    v_emb, v_labels = None, None
    if validation:
        v_emb, v_labels, _, _ = embed_labelled(model, validation, "validation")
    rule = pcfg.rule
    if rule == "auto":  # chosen on the validation scans, never on the support set itself
        rule = "centroid"
        if v_emb is not None and set(v_labels) <= set(labels):
            rule = select_rule(
                emb, labels, v_emb, v_labels, pcfg.rule_candidates, pcfg.temperature,
                pcfg.rule_options,
            ).name  # fmt: skip
    protos = build_prototypes(
        emb, labels, pcfg.temperature, pcfg.unknown_threshold, scan_ids=ids, thumbnails=thumbs,
        rule=rule, rule_options=pcfg.rule_options,
    )  # fmt: skip
    cal = None
    if validation:
        far = target_far if target_far is not None else pcfg.target_far
        protos, cal = calibrate(protos, v_emb, v_labels, far)
    if temperature is not None:
        protos.temperature = temperature
    if unknown_threshold is not None:
        protos.unknown_threshold = unknown_threshold
    with mlflow.start_run(run_name=f"prototypes-{name}") as run:
        mlflow.log_params(
            {
                "source_model": model_uri,
                "support_size": len(support),
                "validation_size": len(validation or []),
                "classes": ",".join(protos.classes),
                "decision_rule": rule,
                "temperature": protos.temperature,
                "unknown_threshold": protos.unknown_threshold,
            }
        )
        if cal is not None:
            mlflow.log_metrics(cal.metrics())
            with tempfile.TemporaryDirectory() as tmp:
                cal.curve.to_csv(Path(tmp) / "open_set_curve.csv", index=False)
                if len(cal.curve):
                    save_curve_figure(cal, Path(tmp) / "open_set_curve.png")
                mlflow.log_artifacts(tmp, artifact_path="calibration")
        info = log_model(model.encoder, protos, model.settings, registered_name=name)
    version = str(info.registered_model_version)
    MlflowClient().update_model_version(
        name,
        version,
        version_description(model_uri, model.settings, protos.classes, ids, workspace),
    )
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version)
    return Registered(
        name, version, alias or "", f"models:/{name}/{version}", run.info.run_id, protos.classes
    )


HEADLINE = (
    "accuracy", "balanced_accuracy", "auroc", "kappa_quadratic", "precision_at_1",
    "mean_average_precision_at_r", "fewshot_base_accuracy", "fewshot_novel_accuracy",
)  # fmt: skip


def data_fingerprint(settings: Settings, support_ids: list[str], ws: Workspace | None) -> str:
    """What data the version stands on: the preprocessing chain, the support scans and (with a
    workspace) the catalog's train+val scans, each as a short content hash."""
    parts = [f"preprocessing {settings.preprocess.fingerprint()}"]
    parts.append(f"support {_digest(sorted(support_ids))}")
    if ws is not None:
        scans = Catalog(ws.catalog_url).list_scans(class_set="base")
        seen = sorted(s["content_hash"] for s in scans if s["split"] in ("train", "val"))
        parts.append(f"train+val {_digest(seen)} ({len(seen)} scans)")
    return ", ".join(parts)


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:12]


def version_description(
    model_uri: str,
    settings: Settings,
    classes: list[str],
    support_ids: list[str],
    ws: Workspace | None = None,
) -> str:
    """The model version's description (markdown): classes, the training run with a link and
    its test metrics, and the data fingerprint."""
    client = MlflowClient()
    run_id = mlflow.models.get_model_info(model_uri).run_id
    lines = [f"**Classes:** {', '.join(classes)}", ""]
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        run = None
    if run is not None:
        link = f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
        lines.append(f"**Training run:** [{run.info.run_name or run_id}]({link}) (`{run_id}`)")
        split = settings.evaluate.split
        shown = [
            f"{m} {run.data.metrics[f'{split}_{m}']:.3f}"
            for m in HEADLINE
            if f"{split}_{m}" in run.data.metrics
        ]
        if shown:
            lines.append(f"**{split} metrics:** " + ", ".join(shown))
    else:
        lines.append(f"**Training run:** `{run_id}` (not in this tracking store)")
    lines += ["", f"**Data:** {data_fingerprint(settings, support_ids, ws)}"]
    return "\n".join(lines)


def catalog_pairs(workspace: Workspace, split: str) -> list[tuple[str, str]]:
    """``(volume path, label)`` of a catalog split's labelled base-class scans."""
    scans = Catalog(workspace.catalog_url).list_scans(split, class_set="base")
    return [(str(workspace.root / s["volume"]), s["label"]) for s in scans]


def draw_support(ws: Workspace, shots: int, seed: int, out: Path) -> Path:
    """Write ``shots`` training-split scans per class (seeded) to a support CSV at ``out``."""
    scans = Catalog(ws.catalog_url).list_scans(split="train")
    picks = select_support([s["label"] for s in scans], shots, np.random.default_rng(seed))
    with atomic_path(out, suffix=".csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "scan_id"])
        for i in picks:
            s = scans[i]
            writer.writerow([str(ws.root / s["volume"]), s["label"], s["scan_id"]])
    return out


def register_from_catalog(
    model_uri: str, cfg: PrototypeConfig, ws: Workspace, support: str | Path | None = None
) -> tuple[Registered, Path]:
    """Register ``model_uri`` with prototypes of ``support`` (default: ``cfg.shots`` scans per
    class drawn from the train split into ``WS/reports/support.csv``) under
    ``cfg.model_name@cfg.alias``; temperature (and, with ``cfg.target_far``, the 'unknown'
    threshold) are fitted on the catalog's validation split."""
    if support is None:
        support = draw_support(ws, cfg.shots, cfg.seed, ws.reports / "support.csv")
    reg = register_prototypes(
        model_uri,
        read_support(support),
        cfg.model_name,
        cfg.alias,
        validation=catalog_pairs(ws, "val") or None,
        workspace=ws,
    )
    return reg, Path(support)
