"""Register a model version with new prototypes from a support set; no retraining needed."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from medml.fewshot.prototypes import build_prototypes
from medml.ingest.nifti import is_nifti_name
from medml.predict.pyfunc import load_medml_model, log_model


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


def register_prototypes(
    model_uri: str,
    support: list[tuple[str, str]],
    name: str,
    alias: str | None = "champion",
    temperature: float | None = None,
    unknown_threshold: float | None = None,
) -> Registered:
    """Embed the support scans with the model's encoder and register encoder + new prototypes."""
    model = load_medml_model(model_uri)
    paths, labels = [p for p, _ in support], [lab for _, lab in support]
    emb, _, errors = model.embed_paths(paths)
    bad = [f"{p}: {e}" for p, e in zip(paths, errors) if e]
    if bad:
        raise ValueError("unreadable support scans:\n" + "\n".join(bad))
    pcfg = model.settings.prototypes
    protos = build_prototypes(
        emb,
        labels,
        temperature or pcfg.temperature,
        unknown_threshold if unknown_threshold is not None else pcfg.unknown_threshold,
    )
    with mlflow.start_run(run_name=f"prototypes-{name}") as run:
        mlflow.log_params(
            {
                "source_model": model_uri,
                "support_size": len(paths),
                "classes": ",".join(protos.classes),
            }
        )
        info = log_model(model.encoder, protos, model.settings, registered_name=name)
    version = str(info.registered_model_version)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version)
    return Registered(
        name, version, alias or "", f"models:/{name}/{version}", run.info.run_id, protos.classes
    )
