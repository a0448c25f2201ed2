"""MLflow wiring: embedded SQLite in the workspace unless MLFLOW_TRACKING_URI says otherwise."""

from __future__ import annotations

import os

import mlflow
from pydantic import BaseModel

from medml.workspace import Workspace

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def configure(ws: Workspace) -> str:
    """Point MLflow at the workspace's tracking store; return its URI."""
    uri = ws.mlflow_uri
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    # The registry lives in the same store. Always set it: MLflow keeps the last one, and
    # another workspace's must not linger in this process.
    mlflow.set_registry_uri(uri)
    if before["MLFLOW_TRACKING_URI"] is None:
        # MLflow mirrors both into the environment; a workspace's own store must not leak
        # into child processes (or later Workspace.mlflow_uri calls) as if the user set it.
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return uri


def use_experiment(ws: Workspace, name: str) -> str:
    """Create the experiment (artifacts under ``ws/mlartifacts``) if needed; make it active."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # A tracking server stores artifacts where it is configured to; a database URI
        # (SQLite, PostgreSQL) has no artifact store of its own: use the workspace's.
        server = ws.mlflow_uri.split(":", 1)[0] in {"http", "https", "databricks"}
        location = None if server else ws.mlartifacts.as_uri()
        exp_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        exp_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_params_flat(params: dict) -> None:
    """Log a flattened config; MLflow caps values at 6000 characters."""
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def resolve_model_uri(model_uri: str) -> dict[str, str]:
    """``models:/NAME@alias`` as the version it points at now (``models:/NAME/V``) with that
    version's identity (run, creation time, source); any other URI unchanged."""
    if not (model_uri.startswith("models:/") and "@" in model_uri):
        return {"uri": model_uri}
    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    mv = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    return {
        "uri": f"models:/{name}/{mv.version}",
        "name": name,
        "version": str(mv.version),
        "run_id": str(mv.run_id),
        "created": str(mv.creation_timestamp),
        "source": str(mv.source),
    }


def log_plans(plans: BaseModel, applied: dict | None = None) -> None:
    """Log ``medml.planning.Plans`` to the active run: ``plans.json`` as an artifact, the
    decisions as ``plans.*`` params (apart from the config's ``plan.*``) and, given ``applied``
    (what ``medml.planning.planned_updates`` filled in), the keys the plans set as a tag.

    Typed as a plain pydantic model: tracking sits below planning in the layers."""
    data = plans.model_dump(mode="json")
    mlflow.log_dict(data, "plans.json")
    decisions = ("version", "catalog_digest", "modality", "pixdim", "spatial_size", "window")
    log_params_flat({f"plans.{k}": data[k] for k in (*decisions, "batch_size", "memory_gb")})
    if applied is not None:
        keys = [f"{section}.{key}" for section, fills in applied.items() for key in fills]
        mlflow.set_tag("medml.from_plans", ",".join(sorted(keys)) or "none")
