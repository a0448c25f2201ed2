"""Deployable few-shot model: a new class from 5 scans without retraining, calibration logged,
the registry by alias, `mlflow models predict` from the command line, champion/challenger,
batch inference with error rows, Parquet, an idempotent re-run, and the explain PNG."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from medml.cli import app
from medml.predict.batch import ledger_path, predict_frame
from medml.predict.pyfunc import load_medml_model
from medml.tracking import configure

NAME = "medml-tiny"
runner = CliRunner()


def _refuse(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


def _missing(value) -> bool:
    """JSON output writes a missing value as null."""
    return value is None


@pytest.fixture(scope="module")
def setup(predict_model):
    configure(predict_model["ws"])
    return predict_model


def test_calibration_is_fitted_on_validation_and_logged(setup):
    v1 = setup["v1"]
    protos = load_medml_model(f"models:/{NAME}@champion").prototypes
    assert protos.unknown_threshold is not None and -1.0 <= protos.unknown_threshold <= 1.0
    assert len(protos.support_ids) == len(setup["support"]) and protos.thumbnails is not None
    client = MlflowClient()
    run = client.get_run(v1.run_id)
    assert float(run.data.params["temperature"]) == pytest.approx(protos.temperature)
    assert run.data.metrics["calib_nll_after"] <= run.data.metrics["calib_nll_before"] + 1e-9
    logged = {a.path for a in client.list_artifacts(v1.run_id, "calibration")}
    assert logged == {"calibration/open_set_curve.csv", "calibration/open_set_curve.png"}


def test_new_class_from_five_scans_then_promote(setup):
    root, ws = setup["root"], setup["ws"]
    support_csv = root / "support.csv"
    with support_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(setup["support"])
        w.writerows((p, "noise") for p in setup["noise"][:5])
    res = runner.invoke(
        app,
        [
            "prototypes",
            "-m",
            f"models:/{NAME}@champion",
            "--support",
            str(support_csv),
            "--register",
            NAME,
            "--alias",
            "challenger",
            "--far",
            "0.05",
            "--workspace",
            str(ws.root),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "@challenger" in res.output and "noise" in res.output
    old = load_medml_model(f"models:/{NAME}@champion")
    new = load_medml_model(f"models:/{NAME}@challenger")
    assert new.prototypes.classes == sorted([*old.prototypes.classes, "noise"])
    for k, v in old.encoder.state_dict().items():  # same encoder: no retraining
        assert torch.equal(v, new.encoder.state_dict()[k])
    # Unseen noise scans go to the new class; base scans keep their class unless they move to it.
    queries = pd.DataFrame({"path": setup["noise"][5:] + [p for p, _ in setup["val"]]})
    before = old.predict(None, queries)
    after = new.predict(None, queries)
    probs_after = after[[f"prob_{c}" for c in new.prototypes.classes]].to_numpy()
    argmax_after = np.array(new.prototypes.classes)[probs_after.argmax(axis=1)]
    # The 1-epoch test encoder separates little, so ask for a clear majority, not all five.
    assert list(argmax_after[:5]).count("noise") >= 4
    assert "prob_noise" not in before.columns
    probs_before = before[[f"prob_{c}" for c in old.prototypes.classes]].to_numpy()
    argmax_before = np.array(old.prototypes.classes)[probs_before.argmax(axis=1)]
    moved = argmax_before != argmax_after
    assert set(argmax_after[moved]) <= {"noise"}

    # Champion/challenger on validation that includes the new class: the challenger wins.
    val_csv = root / "val.csv"
    with val_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(setup["val"])
        w.writerows((p, "noise") for p in setup["noise"][5:])
    res = runner.invoke(
        app, ["promote", NAME, "--validation", str(val_csv), "--workspace", str(ws.root)]
    )
    assert res.exit_code == 0, res.output
    assert res.output.startswith("promoted: challenger v2 is better than champion v1"), res.output
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    res = runner.invoke(
        app, ["promote", NAME, "--validation", str(val_csv), "--workspace", str(ws.root)]
    )
    assert res.exit_code == 0 and res.output.startswith("kept champion: "), res.output


def test_mlflow_models_predict_from_the_command_line(setup):
    root, ws = setup["root"], setup["ws"]
    good = setup["val"][0][0]
    pd.DataFrame({"path": [good, str(root / "missing.nii.gz")]}).to_csv(
        root / "input.csv", index=False
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": ws.mlflow_uri}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.run(
        [
            str(mlflow_bin),
            "models",
            "predict",
            "-m",
            f"models:/{NAME}@champion",
            "-i",
            str(root / "input.csv"),
            "-t",
            "csv",
            "--env-manager",
            "local",
            "-o",
            str(root / "out.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((root / "out.json").read_text(), parse_constant=_refuse)["predictions"]
    assert len(rows) == 2
    assert _missing(rows[0]["error"]) and rows[0]["predicted_class"]
    assert rows[0]["similarity"] <= 1.0 and rows[0]["margin"] >= 0
    assert len(rows[0]["nearest_support"].split(";")) == 3
    assert rows[1]["error"] == "does not exist" and _missing(rows[1]["predicted_class"])
    assert rows[1]["input"].endswith("missing.nii.gz") and _missing(rows[1]["similarity"])
    # The same model through the Python API by alias.
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert model.metadata.signature.inputs.input_names() == ["path", "scan_id"]
    frame = model.predict(pd.DataFrame({"path": [good]}))
    assert frame.loc[0, "scan_id"] == rows[0]["scan_id"]


def test_batch_error_rows_parquet_idempotent_rerun_and_explain(setup):
    root = setup["root"]
    inputs = root / "incoming"
    inputs.mkdir()
    good = [p for p, _ in setup["val"][:2]] + setup["noise"][5:6]
    for i, p in enumerate(good):
        shutil.copy(p, inputs / f"patient_{i}.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file")
    rows = sorted(str(p) for p in inputs.iterdir()) + [str(root / "gone.nii.gz")]
    out = root / "preds" / "predictions.csv"
    summary = predict_frame(
        f"models:/{NAME}@champion",
        pd.DataFrame({"path": rows}),
        out,
        batch_size=2,
        progress=False,
        formats=["csv", "parquet"],
        explain=root / "explain",
    )
    assert summary.n_inputs == 5 and summary.n_errors == 2 and summary.n_skipped == 0
    csv_rows = pd.read_csv(out)
    pq_rows = pd.read_parquet(out.with_suffix(".parquet"))
    assert len(csv_rows) == len(pq_rows) == 5
    assert list(csv_rows.scan_id.dropna()) == list(pq_rows.scan_id.dropna())
    assert list(csv_rows["input"]) == rows  # the path as given, in input order
    errors = csv_rows.error.tolist()
    assert errors[-1] == "does not exist" and "NIfTI" in errors[0]  # broken.nii.gz sorts first
    assert not any(isinstance(e, str) and "nii.gz" in e for e in errors)  # no path in errors
    pngs = sorted((root / "explain").glob("*.png"))
    assert [p.name for p in pngs] == ["0002_patient_0.png", "0003_patient_1.png",
                                      "0004_patient_2.png"]  # fmt: skip
    assert all(p.stat().st_size > 1000 for p in pngs)

    again = predict_frame(
        f"models:/{NAME}@champion",
        pd.DataFrame({"path": rows}),
        out,
        batch_size=2,
        progress=False,
        formats=["csv", "parquet"],
    )
    assert again.n_skipped == 3 and again.n_errors == 2 and again.n_inputs == 5
    pd.testing.assert_frame_equal(pd.read_csv(out), csv_rows)
    assert len(ledger_path(out).read_text().splitlines()) == 3


def test_a_dicom_series_folder_predicts_as_its_ingested_volume(setup, tiny_raw):
    """Production reads a DICOM folder with ingestion's readers: the same voxels, content id
    and prediction as the canonical volume that ingestion wrote for that series."""
    root, ws = setup["root"], setup["ws"]
    series = sorted(tiny_raw.glob("dicom/*/*/series-*"))[0]
    volumes = sorted(str(p) for p in ws.volumes.glob("*.nii.gz"))
    out = root / "dicom-preds" / "predictions.csv"
    summary = predict_frame(
        f"models:/{NAME}@champion",
        pd.DataFrame({"path": [str(series), *volumes]}),
        out,
        batch_size=4,
        progress=False,
        ledger=False,
    )
    rows = pd.read_csv(out)
    assert summary.n_errors == 0 and len(rows) == len(volumes) + 1
    dicom_row = rows.iloc[0]
    twins = rows.iloc[1:][rows.iloc[1:].scan_id == dicom_row.scan_id]
    assert len(twins) == 1
    assert twins.iloc[0].predicted_class == dicom_row.predicted_class
    assert twins.iloc[0].similarity == pytest.approx(dicom_row.similarity, abs=1e-6)


def test_evaluate_follows_the_models_split_unless_split_is_given(setup):
    """`medml evaluate` used to evaluate 'test' whatever the model's evaluate.split said."""
    from medml.registry.package import package_run

    ws, settings, trained = setup["ws"], setup["settings"], setup["trained"]
    on_val = settings.model_copy(
        update={"evaluate": settings.evaluate.model_copy(update={"split": "val", "episodes": 5})}
    )
    uri = package_run(trained.run_id, on_val, ws, trained.checkpoint)
    for extra, expected in (([], "val"), (["--split", "train"], "train")):
        res = runner.invoke(app, ["evaluate", "-m", uri, "--workspace", str(ws.root), *extra])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output.strip().splitlines()[-1])["split"] == expected


def test_model_version_description_names_classes_run_metrics_and_data(setup):
    v1, trained = setup["v1"], setup["trained"]
    desc = MlflowClient().get_model_version(NAME, v1.version).description
    assert f"**Classes:** {', '.join(v1.classes)}" in desc
    assert f"/runs/{trained.run_id})" in desc  # a link to the training run in the MLflow UI
    assert "**test metrics:** accuracy " in desc
    fingerprint = setup["settings"].preprocess.fingerprint()
    assert f"preprocessing {fingerprint}" in desc and "train+val " in desc
