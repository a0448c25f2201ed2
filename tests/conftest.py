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


def untrained_copy(ingested: Workspace, dest: Path) -> Workspace:
    """A copy of the ingested tiny workspace without its runs, checkpoints or MLflow store:
    where a test module trains a model of its own."""
    import shutil

    shutil.copytree(ingested.root, dest)
    for sub in ("checkpoints", "mlartifacts"):
        shutil.rmtree(dest / sub, ignore_errors=True)
    (dest / "mlflow.db").unlink(missing_ok=True)
    return Workspace(dest).ensure()


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


# ------------------------------------------------------------------ a trained tiny model

PREDICT_NAME = "medml-tiny"


def _noise_volume(path: Path, seed: int) -> str:
    """A scan of a class the encoder never saw: uniform noise in a 24^3 volume."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    data = rng.uniform(-1000, 400, size=(24, 24, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([8.0, 8.0, 8.0, 1.0])), str(path))
    return str(path)


@pytest.fixture(scope="session")
def predict_model(tmp_path_factory, ingested, tiny_settings):
    """A 1-epoch model, v1 = base classes calibrated on val (@champion), noise scans on disk.

    Shared by the prediction tests; tests that change the registry add versions and aliases
    of their own (``models:/medml-tiny/1`` stays the base model)."""

    import numpy as np

    from medml.fewshot.prototypes import select_support
    from medml.registry.register import catalog_pairs, register_prototypes
    from medml.tracking import configure

    root = tmp_path_factory.mktemp("predict")
    ws = untrained_copy(ingested, root / "ws")
    settings = tiny_settings.model_copy(
        update={"train": tiny_settings.train.model_copy(update={"epochs": 1})}
    )
    configure(ws)
    trained = fit_and_package(settings, ws)
    train_pairs = catalog_pairs(ws, "train")
    picks = select_support([lab for _, lab in train_pairs], 2, np.random.default_rng(0))
    base_support = [train_pairs[i] for i in picks]
    val = catalog_pairs(ws, "val")
    v1 = register_prototypes(
        trained.model_uri,
        base_support,
        PREDICT_NAME,
        "champion",
        validation=val,
        target_far=0.05,
        workspace=ws,
    )
    (root / "noise").mkdir()
    noise = [_noise_volume(root / "noise" / f"n{s}.nii.gz", s) for s in range(10)]
    return {
        "root": root, "ws": ws, "v1": v1, "support": base_support, "val": val, "noise": noise,
        "trained": trained, "settings": settings,
    }  # fmt: skip
