"""End to end: the Prefect pipeline flow on tiny data, checked through real MLflow and Prefect."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from prefect.testing.utilities import prefect_test_harness

from flows.batch_inference import batch_inference_flow
from flows.pipeline import pipeline
from medml.catalog import Catalog
from medml.config import load_settings
from medml.tracking import configure
from medml.workspace import Workspace

pytestmark = pytest.mark.slow
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def harness():
    """One Prefect API for the module: the first run, the re-runs and the Dask run."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def run(harness, tmp_path_factory, tiny_settings):
    ws = Workspace(tmp_path_factory.mktemp("pipeline-ws"))
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
    full = pd.read_parquet(ws.reports / "predictions.parquet")  # CSV numbers are rounded
    assert list(full.scan_id) == list(preds.scan_id) and list(full.columns) == list(preds.columns)
    probs = full[[c for c in full.columns if c.startswith("prob_CT-")]]
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
    metrics = state.result()["train"]["metrics"]
    assert 0.0 <= data.metrics["test_accuracy"] <= 1.0
    # Retrieval metrics are undefined (NaN: not logged, None in the JSON step result) when a
    # tiny test split has a single scan of each class; whatever is defined must be logged and
    # within [0, 1].
    for key in ("precision_at_1", "r_precision", "mean_average_precision_at_r"):
        value = metrics[key]
        if value is not None and value == value:
            logged = data.metrics[f"test_{key}"]
            assert 0.0 <= logged <= 1.0 and logged == pytest.approx(value)
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
    assert pd.isna(out.loc[2, "predicted_class"]) and out.loc[2, "error"] == "does not exist"
    assert out.loc[1, "scan_id"] and len(out.loc[1, "scan_id"]) == 16


# --- orchestration: caching, artifacts, Dask (these run last: they add model versions) ---

CACHED_STEPS = (
    "synthesize",
    "ingest",
    "plan",
    "preprocess",
    "train",
    "prototypes",
    "predict-batch",
)


def _task_states(flow_run_id) -> dict[str, set[str]]:
    """State names of the task runs of a flow run and of its subflows, by task name."""
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        ids = [flow_run_id, *(f.id for f in subflows)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    states: dict[str, set[str]] = {}
    for tr in runs:
        states.setdefault(tr.name.rsplit("-", 1)[0], set()).add(tr.state.name)
    return states


def test_first_run_computed_every_step_and_made_artifacts(run):
    _, state, _ = run
    flow_run_id = state.state_details.flow_run_id
    states = _task_states(flow_run_id)
    for step in CACHED_STEPS:
        assert states[step] == {"Completed"}, (step, states)
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    by_key = {a.key: a for a in arts}
    assert {"ingest-report", "evaluation", "prediction-summary", "predictions"} <= set(by_key)
    ingest_md = by_key["ingest-report"].data
    assert "# Ingest" in ingest_md and "quarantined" in ingest_md
    assert "case-0" not in ingest_md and str(run[0].raw) not in ingest_md  # no source path
    assert "precision_at_1" in str(by_key["evaluation"].data)


def test_rerun_skips_unchanged_steps_and_a_config_change_reruns_only_dependents(run, tiny_settings):
    ws, first, _ = run
    before = first.result()
    again = pipeline(tiny_settings, str(ws.root), return_state=True)
    assert again.is_completed(), again.message
    states = _task_states(again.state_details.flow_run_id)
    for step in CACHED_STEPS:
        assert states[step] == {"Cached"}, (step, states)
    result = again.result()
    assert result["train"]["run_id"] == before["train"]["run_id"]
    assert result["champion"]["version"] == before["champion"]["version"]
    assert (ws.reports / "predictions.csv").exists()

    # A new support-set seed changes the prototypes: they and the predictions re-run, the
    # steps upstream (data, cache, training) come from the cache.
    changed = load_settings(TINY_CONFIG, ["prototypes.seed=11"])
    third = pipeline(changed, str(ws.root), return_state=True)
    assert third.is_completed(), third.message
    states = _task_states(third.state_details.flow_run_id)
    for step in ("synthesize", "ingest", "plan", "preprocess", "train"):
        assert states[step] == {"Cached"}, (step, states)
    for step in ("prototypes", "predict-batch"):
        assert states[step] == {"Completed"}, (step, states)
    result = third.result()
    assert result["train"]["run_id"] == before["train"]["run_id"]
    assert int(result["champion"]["version"]) == int(before["champion"]["version"]) + 1


def test_dask_runner_predicts_the_same_as_threads(run, tmp_path):
    """predict-batch mapped on a 2-worker LocalCluster, compared with the thread runner."""
    ws, _, _ = run
    volumes = sorted(str(p) for p in ws.volumes.glob("*.nii.gz"))[:4]
    frames = {}
    for runner in ("threads", "dask"):
        settings = load_settings(
            TINY_CONFIG,
            [
                f"orchestration.task_runner={runner}",
                "orchestration.dask_workers=2",
                "orchestration.scans_per_task=2",
                "orchestration.cache=false",  # both runs compute: no batch from the cache
            ],
        )
        out = tmp_path / f"{runner}.csv"
        summary = batch_inference_flow(
            inputs=volumes, out=str(out), settings=settings, workspace=str(ws.root)
        )
        assert summary["n"] == 4 and summary["errors"] == 0
        frames[runner] = pd.read_csv(out)
    pd.testing.assert_frame_equal(frames["threads"], frames["dask"])


def test_dask_runner_ingests_the_same_catalog_as_the_default(
    harness, tiny_raw, tmp_path, monkeypatch
):
    """Each series converted by a ``convert-scan`` task on a 2-worker LocalCluster."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.ingest import ingest_flow

    monkeypatch.setenv("MEDML_DEID_SECRET", "dask-vs-default")  # the same keys in both runs
    states = {}
    for runner in ("threads", "dask"):
        settings = load_settings(
            TINY_CONFIG,
            [f"orchestration.task_runner={runner}", "orchestration.dask_workers=2"],
        )
        ws = Workspace(tmp_path / runner)
        result = ingest_flow(
            str(tiny_raw), str(tiny_raw / "labels.csv"), settings=settings, workspace=str(ws.root)
        )
        assert result["scans"] > 0 and result["quarantined"] == 0
        rows = [
            {k: v for k, v in r.items() if k != "ingest_run"}
            for r in Catalog(ws.catalog_url).list_scans(labelled=False)
        ]
        volumes = {p.name: p.read_bytes() for p in sorted(ws.volumes.iterdir())}
        states[runner] = (rows, volumes, result["scan_ids"])
    assert states["dask"] == states["threads"]
    with get_client(sync_client=True) as client:
        converted = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="convert-scan"))
        )
    assert len([t for t in converted if t.state and t.state.is_completed()]) >= len(
        states["dask"][0]
    )


def test_sweep_flow_tabulates_losses_and_is_cached_on_rerun(run):
    """The sweep flow over medml.sweep: its table as an artifact, then skipped when unchanged."""
    from flows.sweep import sweep_flow

    ws, _, _ = run
    settings = load_settings(TINY_CONFIG, ["train.epochs=1"])
    budget = {"folds": 2, "trials": 1, "seeds": 1}
    first = sweep_flow(["triplet", "supcon"], settings, str(ws.root), **budget, return_state=True)
    assert first.is_completed(), first.message
    result = first.result()
    assert result["trials"] == {"triplet": 1, "supcon": 1} and Path(result["table_md"]).exists()
    flow_run_id = first.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert "sweep-table" in {a.key for a in arts}
    assert _task_states(flow_run_id)["sweep-fit"] == {"Completed"}
    again = sweep_flow(["triplet", "supcon"], settings, str(ws.root), **budget, return_state=True)
    assert _task_states(again.state_details.flow_run_id)["sweep"] == {"Cached"}
    assert again.result()["parent_run_id"] == result["parent_run_id"]
