"""MLflow and the catalog on a real PostgreSQL (127.0.0.1:5432, trust auth), in fresh databases
created for this run and dropped after: ingest -> train -> register -> load by alias -> predict."""

from __future__ import annotations

import os
import uuid

import mlflow
import pandas as pd
import pytest
from conftest import fit_and_package
from mlflow import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils

from medml.catalog import Catalog
from medml.ingest import ingest
from medml.registry.register import register_prototypes
from medml.tracking import configure
from medml.workspace import Workspace

psycopg = pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver) not installed")
pytestmark = pytest.mark.slow
HOST, PORT = "127.0.0.1", 5432


def _admin():
    """A connection to the `test` database as the first user the server accepts, or None."""
    for user in ("postgres", "root", os.environ.get("USER") or "postgres"):
        try:
            conn = psycopg.connect(
                host=HOST, port=PORT, dbname="test", user=user, connect_timeout=3, autocommit=True
            )
        except psycopg.OperationalError:
            continue
        return conn, user
    return None, None


@pytest.fixture()
def pg_urls():
    conn, user = _admin()
    if conn is None:
        pytest.skip(f"no PostgreSQL answers on {HOST}:{PORT} (database 'test', trust auth)")
    names = [f"medml_test_{uuid.uuid4().hex[:10]}_{part}" for part in ("mlflow", "catalog")]
    # MLflow keeps the last tracking/registry URIs process-wide (the registry one also in
    # $MLFLOW_REGISTRY_URI): put them back so later tests do not reach a dropped database.
    tracking, registry_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_REGISTRY_URI")
    registry = registry_utils._registry_uri
    with conn:
        for name in names:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield [f"postgresql+psycopg://{user}@{HOST}:{PORT}/{name}" for name in names]
        finally:
            mlflow.set_tracking_uri(tracking)
            registry_utils._registry_uri = registry
            if registry_env is None:
                os.environ.pop("MLFLOW_REGISTRY_URI", None)
            else:
                os.environ["MLFLOW_REGISTRY_URI"] = registry_env
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_mlflow_and_catalog_on_postgresql(pg_urls, monkeypatch, tmp_path, tiny_raw, tiny_settings):
    mlflow_url, catalog_url = pg_urls
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    monkeypatch.setenv("MEDML_CATALOG_URL", catalog_url)
    ws = Workspace(tmp_path / "ws").ensure()
    assert configure(ws) == mlflow_url

    result = ingest(tiny_raw, ws, tiny_raw / "labels.csv", tiny_settings.ingest, progress=False)
    scans = Catalog(catalog_url).list_scans()
    assert len(scans) == result.counts["scans"] > 0

    trained = fit_and_package(tiny_settings, ws)
    reg = register_prototypes(
        trained.model_uri,
        [(str(ws.root / s["volume"]), s["label"]) for s in Catalog(catalog_url).list_scans()],
        "medml-pg",
        "champion",
    )
    model = mlflow.pyfunc.load_model("models:/medml-pg@champion")
    out = model.predict(pd.DataFrame({"path": [str(ws.root / scans[0]["volume"])]}))
    assert out.loc[0, "predicted_class"] in {s["label"] for s in scans}

    # The rows really are in PostgreSQL, and the artifacts in the workspace (not ./mlruns).
    client = MlflowClient()
    run = client.get_run(trained.run_id)
    assert run.data.metrics["best_epoch"] >= 1
    history = client.get_metric_history(trained.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, tiny_settings.train.epochs + 1))
    assert run.info.artifact_uri.startswith(ws.mlartifacts.as_uri())
    assert str(client.get_model_version_by_alias("medml-pg", "champion").version) == reg.version
    with psycopg.connect(mlflow_url.replace("postgresql+psycopg", "postgresql")) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM runs WHERE run_uuid = %s", (trained.run_id,)
        ).fetchone()
    assert n == 1
    with psycopg.connect(catalog_url.replace("postgresql+psycopg", "postgresql")) as conn:
        (n,) = conn.execute("SELECT count(*) FROM scans").fetchone()
    assert n == len(scans)
