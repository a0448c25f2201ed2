"""Shared fixtures: tiny synthetic data (real DICOM + NIfTI), ingested into a temp workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MEDML_WORKSPACE", None)
os.environ.pop("MEDML_CATALOG_URL", None)

from medml.config import Settings, load_settings  # noqa: E402
from medml.ingest import ingest  # noqa: E402
from medml.synth import generate  # noqa: E402
from medml.workspace import Workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_settings() -> Settings:
    """Tiny volumes (32 matrix, 16^3 network input), a handful of patients, 2 epochs."""
    return load_settings(TINY)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory, tiny_settings) -> Path:
    """A synthetic mixed DICOM/NIfTI export; treat as read-only."""
    out = tmp_path_factory.mktemp("raw")
    generate(tiny_settings.synth, out, progress=False)
    return out


@pytest.fixture(scope="session")
def ingested(tmp_path_factory, tiny_raw, tiny_settings) -> Workspace:
    """The tiny export ingested into a session workspace; treat as read-only."""
    ws = Workspace(tmp_path_factory.mktemp("ws")).ensure()
    ingest(tiny_raw, ws, tiny_raw / "labels.csv", tiny_settings.ingest, progress=False)
    return ws


@pytest.fixture(autouse=True)
def _restore_mlflow_environment():
    """MLflow mirrors set_tracking_uri/set_registry_uri/set_experiment into MLFLOW_* variables;
    restore them after each test so no test (or its subprocesses) inherits another's server."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        if key not in saved:
            del os.environ[key]
    os.environ.update(saved)


def fit_and_package(settings: Settings, ws: Workspace, **kwargs):
    """What ``medml train`` does: fit, evaluate the best epoch, package it as an MLflow model.

    Returns the fit result with ``model_uri`` and the evaluation ``metrics`` attached.
    """
    from medml.evaluate.run import evaluate_run
    from medml.registry.package import package_run
    from medml.train import train

    fitted = train(settings, ws, progress=False, **kwargs)
    fitted.metrics = evaluate_run(fitted.run_id, settings, ws, fitted.checkpoint)
    fitted.model_uri = package_run(fitted.run_id, settings, ws, fitted.checkpoint)
    return fitted
