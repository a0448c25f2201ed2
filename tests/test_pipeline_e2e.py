"""End to end: the Prefect pipeline flow on tiny data, checked through real MLflow and Prefect."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import pipeline
from medml.catalog import Catalog
from medml.tracking import configure
from medml.workspace import Workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_settings):
    ws = Workspace(tmp_path_factory.mktemp("pipeline-ws"))
    with prefect_test_harness(server_startup_timeout=180):
        state = pipeline(tiny_settings, str(ws.root), return_state=True)
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(state.state_details.flow_run_id)
    return ws, state, flow_run


def test_flow_run_completed_with_named_tasks(run):
    _, state, flow_run = run
    assert state.is_completed(), state.message
    assert flow_run.state.is_completed()
    assert flow_run.name and flow_run.flow_id


def test_predictions_file_covers_the_held_out_scans(run, tiny_settings):
    ws, state, _ = run
    result = state.result()
    preds = pd.read_csv(ws.reports / "predictions.csv")
    test_ids = {s["scan_id"] for s in Catalog(ws.catalog_url).list_scans(split="test")}
    assert set(preds.scan_id) == test_ids and len(preds) == result["predict"]["n"]
    probs = preds[[c for c in preds.columns if c.startswith("prob_CT-")]]
    assert probs.shape[1] == 5
    assert (probs.sum(axis=1) - 1).abs().max() < 1e-5
    assert preds.similarity.between(-1, 1).all() and preds.error.isna().all()
    assert set(preds.predicted_class) <= {f"CT-{i}" for i in range(5)}


def test_mlflow_run_has_params_epoch_metrics_and_contract_metrics(run, tiny_settings):
    ws, state, _ = run
    configure(ws)
    run_id = state.result()["train"]["run_id"]
    client = MlflowClient()
    data = client.get_run(run_id).data
    assert data.params["model.backbone"] == "resnet10"
    assert data.params["loss.miner"] == "semihard"
    for metric in ("train_loss", "val_mean_average_precision_at_r", "val_precision_at_1", "lr"):
        history = client.get_metric_history(run_id, metric)
        assert [m.step for m in history] == list(range(1, tiny_settings.train.epochs + 1)), metric
    for metric in (
        "test_precision_at_1",
        "test_r_precision",
        "test_mean_average_precision_at_r",
        "test_accuracy",
    ):
        assert 0.0 <= data.metrics[metric] <= 1.0
    metrics = state.result()["train"]["metrics"]
    for key in (
        "run_id",
        "split",
        "n",
        "precision_at_1",
        "r_precision",
        "mean_average_precision_at_r",
        "accuracy",
        "balanced_accuracy",
        "kappa_quadratic",
    ):
        assert key in metrics
    assert metrics["fewshot"]["shots"] == tiny_settings.evaluate.shots


def test_champion_loads_as_pyfunc_and_predicts_paths(run, tiny_raw):
    ws, _, _ = run
    configure(ws)
    mv = MlflowClient().get_model_version_by_alias("medml-tiny", "champion")
    assert str(mv.version) == "1"
    model = mlflow.pyfunc.load_model("models:/medml-tiny@champion")
    volume = next(ws.volumes.glob("*.nii.gz"))
    dicom_series = next((tiny_raw / "dicom").rglob("series-1"))
    frame = pd.DataFrame(
        {"path": [str(volume), str(dicom_series), str(ws.root / "missing.nii.gz")]}
    )
    out = model.predict(frame)
    assert len(out) == 3
    assert out.loc[0, "predicted_class"].startswith("CT-") and pd.isna(out.loc[0, "error"])
    assert out.loc[1, "predicted_class"].startswith("CT-") and pd.isna(out.loc[1, "error"])
    assert pd.isna(out.loc[2, "predicted_class"]) and "missing.nii.gz" in out.loc[2, "error"]
    assert out.loc[1, "scan_id"] and len(out.loc[1, "scan_id"]) == 16
