"""Prediction files a user can trust: rows tied to their inputs in input order, strict JSON over
REST, explanations for reused predictions, readable PNGs, errors that say what to do next,
safe CSV, no paths in error texts, inputs walked as ingestion walks them, and models that load
without running code from the artifact store."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import PREDICT_NAME
from typer.testing import CliRunner

from flows.artifacts import predictions_markdown
from medml.cli import app
from medml.predict.batch import inputs_frame, predict_frame, write_rows
from medml.predict.explain import _title, gradient_saliency, occlusion_saliency
from medml.predict.loader import TamperedModelError, open_model, write_manifest
from medml.predict.output import csv_safe
from medml.registry.register import register_prototypes
from medml.tracking import configure, use_experiment

V1 = f"models:/{PREDICT_NAME}/1"
runner = CliRunner()


def _flat(text: str) -> str:
    """CLI output without the line breaks and boxes of rich panels."""
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


def _refuse(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


@pytest.fixture(scope="module")
def model(predict_model):
    configure(predict_model["ws"])
    return predict_model


def _copy(src: str, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return str(dst)


# ------------------------------------------------------------- 14.1 rows tied to their inputs


def test_rows_follow_input_order_with_the_input_as_given(model, tmp_path, monkeypatch, tiny_raw):
    """Before: no input column, and rows in discovery order (files first, then folders)."""
    good = model["val"][0][0]
    monkeypatch.chdir(tmp_path)
    series = next(tiny_raw.glob("dicom/*/*/series-*"))
    shutil.copytree(series, tmp_path / "batch" / "a_series")
    _copy(good, tmp_path / "batch" / "b.nii.gz")
    _copy(good, tmp_path / "batch" / "c" / "d.nii.gz")
    _copy(good, tmp_path / "z.nii.gz")
    given = ["z.nii.gz", "batch", "nope.nii.gz"]
    frame = inputs_frame(given)
    assert list(frame.path) == [
        "z.nii.gz",
        os.path.join("batch", "a_series"),
        os.path.join("batch", "b.nii.gz"),
        os.path.join("batch", "c", "d.nii.gz"),
        "nope.nii.gz",
    ]
    summary = predict_frame(V1, frame, Path("out.csv"), progress=False, ledger=False)
    rows = pd.read_csv(tmp_path / "out.csv")
    assert list(rows.columns[:4]) == ["input", "scan_id", "predicted_class", "similarity"]
    assert list(rows["input"]) == list(frame.path)
    assert rows.loc[4, "error"] == "does not exist" and summary.n_errors == 1
    assert rows.loc[0, "scan_id"] == rows.loc[2, "scan_id"] == rows.loc[3, "scan_id"]
    # CSV numbers are rounded; Parquet keeps full precision
    text = (tmp_path / "out.csv").read_text()
    assert text.startswith("input,scan_id,")
    assert max(len(x.split(".")[-1]) for x in rows.similarity.dropna().astype(str)) <= 4
    assert "0000000" not in text
    # file modes are those of a plain open(), not mkstemp's 0600
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o666 & ~mask


# ------------------------------------------------------------ 14.2 strict JSON over REST


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rest_endpoint_replies_strict_json(model, tmp_path):
    """Before: error rows had bare NaN, which JSON.parse rejects; a missing path read 'not a
    NIfTI file or a DICOM series folder'."""
    port = _free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": model["ws"].mlflow_uri,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),  # uvicorn lives there
    }
    cmd = [str(Path(venv_bin) / "mlflow"), "models", "serve", "-m", V1, "-p", str(port)]
    cmd += ["--host", "127.0.0.1", "--env-manager", "local", "--workers", "1"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        data = [[model["val"][0][0]], [str(tmp_path / "gone.nii")]]
        body = {"dataframe_split": {"columns": ["path"], "data": data}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        reply = urllib.request.urlopen(req, timeout=60).read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    rows = json.loads(reply, parse_constant=_refuse)["predictions"]
    assert rows[0]["predicted_class"] and rows[0]["error"] is None
    assert rows[1]["error"] == "does not exist"
    assert rows[1]["similarity"] is None and rows[1]["unknown"] is None
    assert rows[1]["input"] == str(tmp_path / "gone.nii")


# ------------------------------------------------- 14.3 / 14.4 explanations a reader can use


def test_explain_regenerates_pngs_for_reused_predictions(model, tmp_path):
    """Before: `--explain` on inputs the ledger already held wrote nothing."""
    inputs = [
        _copy(p, tmp_path / "in" / f"case_{i}.nii.gz") for i, (p, _) in enumerate(model["val"][:2])
    ]
    out = tmp_path / "preds.csv"
    first = predict_frame(V1, pd.DataFrame({"path": inputs}), out, progress=False)
    assert first.n_skipped == 0
    again = predict_frame(
        V1, pd.DataFrame({"path": inputs}), out, progress=False, explain=tmp_path / "png"
    )
    assert again.n_skipped == 2 and again.n_explained == 2
    names = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert names == ["0001_case_0.png", "0002_case_1.png"]
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "png" / names[0])
    assert img.shape[0] >= 900 and img.shape[1] >= 1100  # readable panels, not 80-dpi thumbnails


def test_explanation_is_voxel_fine_and_titled_with_its_uncertainty(model):
    """Before: an 8-voxel occlusion map, no probability, margin or unknown state."""
    m = open_model(V1).model
    vols, _, _ = m.preprocess_paths([model["val"][0][0]])
    fine = gradient_saliency(m, vols[0], 0)
    blocky = occlusion_saliency(m, vols[0], 0)
    assert fine.shape == blocky.shape == tuple(vols[0].shape[1:])

    # voxel-level detail: neighbouring voxels differ, where occlusion repeats patch values
    def repeats(m):
        return float(np.mean(np.diff(m, axis=0) == 0))

    assert repeats(fine) < 0.01 and repeats(blocky) > 10 * max(repeats(fine), 0.001)
    row = pd.Series(
        {"input": "in/case 7.nii.gz", "scan_id": "abc", "predicted_class": "unknown",
         "similarity": 0.41, "margin": 0.004, "prob_CT-0": 0.501, "prob_CT-1": 0.497}
    )  # fmt: skip
    title = _title(row, ["CT-0", "CT-1"], 7)
    for part in ("input 7: case 7.nii.gz", "p(CT-0) = 0.501", "p(CT-1) = 0.497", "margin 0.004",
                 "UNKNOWN", "near tie"):  # fmt: skip
        assert part in title


# ----------------------------------------------------- 14.5 errors that say what to do next


def test_predict_outside_a_workspace_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["predict", "x.nii.gz", "-m", V1, "-o", "p.csv"])
    assert res.exit_code == 2, res.output
    assert "noworkspaceat" in _flat(res.output) and "--workspace" in res.output
    assert not (tmp_path / "workspace").exists() and not (tmp_path / "p.csv").exists()


def test_unknown_alias_lists_what_exists_and_names_the_store(model, tmp_path):
    ws = model["ws"]
    res = runner.invoke(
        app,
        ["predict", "x.nii.gz", "-m", f"models:/{PREDICT_NAME}@nope", "-o", str(tmp_path / "p"),
         "--workspace", str(ws.root)],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    flat = _flat(res.output)
    assert _flat(ws.mlflow_uri) in flat  # the store searched
    assert f"{PREDICT_NAME}:versions1" in flat and "@champion" in flat


def test_training_on_an_empty_catalog_says_ingest_first(tmp_path):
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["train", "--workspace", str(ws), "--set", "train.epochs=1"])
    assert res.exit_code == 1
    assert "thecatalogisempty" in _flat(res.output) and "medmlingest" in _flat(res.output)
    assert not (ws / "mlflow.db").exists()  # no FAILED run left behind


def test_unknown_config_key_lists_the_section_and_the_nearest(tmp_path):
    res = runner.invoke(app, ["train", "--workspace", str(tmp_path), "--set", "train.epoch=1"])
    assert res.exit_code == 2
    flat = _flat(res.output)
    assert "unknownkeytrain.epoch;" in flat and "didyoumeantrain.epochs?" in flat
    assert "validkeysoftrain:amp,batch_size," in flat and "pydantic" not in flat


def test_boolean_options_are_flags_without_a_value():
    for command in ("predict", "ingest", "train", "synth", "serve"):
        res = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert res.exit_code == 0
        assert "<bool>" not in res.output, command
    assert "--rerun " in runner.invoke(app, ["predict", "--help"], terminal_width=200).output


# -------------------------------------------------------- 14.6 / 14.7 artifacts and progress


def test_prefect_artifact_lists_failed_inputs_by_position(model, tmp_path):
    frame = inputs_frame([model["val"][0][0], str(tmp_path / "gone.nii.gz")])
    summary = predict_frame(V1, frame, None, progress=False)
    written = write_rows(summary.rows.to_dict("records"), tmp_path / "p.csv", ["csv"])
    text = predictions_markdown(written, V1)
    assert "| 2 | - | does not exist |" in text and "gone" not in text
    assert written["failures"] == [{"position": 2, "scan_id": None, "error": "does not exist"}]


def test_workers_that_embed_write_the_rows_prediction_here_writes(model, tmp_path, monkeypatch):
    """With worker processes on the CPU (and nothing to explain) the workers embed their
    batches themselves; the rows, errors, order and ledger reuse equal preparing and embedding
    in this process."""
    from medml.predict.prefetch import Prefetcher

    used = []
    real = Prefetcher.embed_map
    monkeypatch.setattr(Prefetcher, "embed_map", lambda self, b: used.append(1) or real(self, b))
    goods = [path for path, _ in model["val"][:5]]
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a NIfTI file")
    frame = pd.DataFrame({"path": [goods[0], str(bad), *goods[1:], str(tmp_path / "gone")]})
    got = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}" / "p.parquet"
        out.parent.mkdir()
        predict_frame(V1, frame.iloc[:4], out, batch_size=1, progress=False, workers=workers)
        s = predict_frame(V1, frame, out, batch_size=1, progress=False, workers=workers)
        assert s.n_skipped == 3 and s.n_errors == 2  # the ledger's rows reused, errors retried
        got[workers] = pd.read_parquet(out)
    assert len(used) == 2  # both runs with 2 workers embedded there (4 batches to do each)
    here, pool = got[0], got[2]
    assert list(here["input"]) == list(pool["input"]) == list(frame["path"])
    assert here["error"].tolist() == pool["error"].tolist()
    assert here["scan_id"].tolist() == pool["scan_id"].tolist()
    assert here["predicted_class"].tolist() == pool["predicted_class"].tolist()
    np.testing.assert_allclose(here["similarity"], pool["similarity"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ issue 15: hostile inputs and stores


def test_input_walk_follows_no_folder_links_and_accounts_for_everything(model, tmp_path):
    good = model["val"][0][0]
    root = tmp_path / "in"
    _copy(good, root / "a.nii.gz")
    (root / "loop").symlink_to(".")
    (root / "also").symlink_to(root)
    (root / "empty").mkdir()
    locked = root / "locked"
    _copy(good, locked / "x.nii.gz")
    locked.chmod(0)
    try:
        frame = inputs_frame([str(root), str(tmp_path / "empty-given")])
        (tmp_path / "empty-given").mkdir()
        frame2 = inputs_frame([str(tmp_path / "empty-given")])
    finally:
        locked.chmod(0o755)
    rows = dict(zip(frame.path, frame.error))
    assert rows[str(root / "a.nii.gz")] is None
    assert "not followed" in rows[str(root / "loop")] and "not followed" in rows[str(root / "also")]
    if os.geteuid() != 0:  # root reads any folder
        assert rows[str(locked)] == "folder cannot be read (permission denied)"
    assert len(frame) == 5  # a, also, locked (or its file), loop, and the missing path
    assert frame2.error.tolist() == ["folder holds no NIfTI file or DICOM series"]
    summary = predict_frame(V1, frame, tmp_path / "p.csv", progress=False, ledger=False)
    assert summary.n_inputs == len(frame) and summary.counts  # the good one still predicted


def test_csv_escapes_formula_cells_and_headers_parquet_keeps_them(model, tmp_path):
    noise = model["noise"]
    support = [(p, '=HYPERLINK("http://x")') for p in noise[:3]]
    support += [(p, "@SUM(1)") for p in noise[3:6]]
    reg = register_prototypes(
        model["trained"].model_uri, support, "medml-formula", "champion", workspace=model["ws"]
    )
    out = tmp_path / "p.csv"
    predict_frame(f"models:/medml-formula/{reg.version}", pd.DataFrame({"path": noise[6:8]}), out,
                  progress=False, formats=["csv", "parquet"])  # fmt: skip
    header = out.read_text().splitlines()[0]
    assert "prob_=HYPERLINK" in header  # starts with 'p': harmless, kept
    cells = pd.read_csv(out)
    assert all(c.startswith(("'=", "'@")) or c == "unknown" for c in cells.predicted_class)
    assert "'@SUM(1)" in cells.nearest_support.iloc[0] or "'" not in cells.nearest_support.iloc[0]
    raw = pd.read_parquet(out.with_suffix(".parquet"))
    assert set(raw.predicted_class) <= {'=HYPERLINK("http://x")', "@SUM(1)", "unknown"}
    assert set(raw.columns) >= {'prob_=HYPERLINK("http://x")', "prob_@SUM(1)"}
    escaped = csv_safe(pd.DataFrame({"-x": ["+1", "\tA", "\rB", "ok", None], "n": [-1.0] * 5}))
    assert list(escaped.columns) == ["'-x", "n"]
    assert escaped["'-x"].tolist()[:4] == ["'+1", "'\tA", "'\rB", "ok"]
    assert escaped["n"].tolist() == [-1.0] * 5  # numbers are not text: left alone


def test_error_texts_logs_and_summaries_carry_no_path(model, tmp_path, caplog):
    folder = tmp_path / "DOE^JOHN_1970"
    folder.mkdir()
    (folder / "scan.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (folder / "series").mkdir()
    (folder / "series" / "IM1").write_bytes(b"DICM? no")
    frame = inputs_frame([str(folder), str(tmp_path / "MISSING^PATIENT.nii")])
    with caplog.at_level(logging.WARNING):
        summary = predict_frame(V1, frame, tmp_path / "p.csv", progress=False)
    rows = pd.read_csv(tmp_path / "p.csv")
    assert summary.n_errors == len(rows) == 3
    texts = [*rows.error, *(r.getMessage() for r in caplog.records), json.dumps(summary.failures)]
    assert not any("DOE" in t or "MISSING" in t or str(tmp_path) in t for t in texts), texts
    assert all(rows.input.str.contains("DOE|MISSING"))  # the one place that names inputs


def test_stored_code_is_never_run_and_tampering_is_refused(model, tmp_path):
    ws = model["ws"]
    reg = register_prototypes(model["trained"].model_uri, model["support"], "medml-tamper",
                              "champion", workspace=ws)  # fmt: skip
    uri = f"models:/medml-tamper/{reg.version}"
    meta = mlflow.models.get_model_info(uri)
    mlmodel = [p for p in ws.mlartifacts.rglob("MLmodel") if meta.model_uuid in p.read_text()]
    assert len(mlmodel) == 1
    folder = mlmodel[0].parent
    text = mlmodel[0].read_text()
    assert "loader_module: medml.predict.loader" in text
    assert "model_code_path" not in text
    # how to load it names no machine path (MLflow's own artifact_path records the store)
    flavors = json.dumps(yaml.safe_load(text)["flavors"])
    assert str(tmp_path.parent.parent) not in flavors and "file:" not in flavors
    assert not list(folder.rglob("*.py"))  # no code stored with the model
    open_model(uri)  # intact: loads
    marker = tmp_path / "ran"
    (stored,) = folder.rglob("settings.yaml")
    with stored.open("a") as fh:
        fh.write(f"# __import__('pathlib').Path('{marker}').touch()\n")
    with pytest.raises(TamperedModelError, match="settings.yaml does not match"):
        open_model(uri)
    with pytest.raises(TamperedModelError):
        mlflow.pyfunc.load_model(uri)  # MLflow's own loading goes through the same check
    # rewriting the manifest too is caught by the hashes kept in the tracking store
    write_manifest(stored.parent)
    with pytest.raises(TamperedModelError, match="recorded in the tracking store"):
        open_model(uri)
    assert not marker.exists()


def test_a_model_logged_from_code_loads_without_running_its_code(model, tmp_path):
    """Models of older medml versions were logged 'from code'; they still load, from their
    data files only."""
    m = open_model(V1).model
    entry = tmp_path / "entry.py"
    entry.write_text(
        "from mlflow.models import set_model\nfrom medml.predict.pyfunc import MedmlModel\n"
        "set_model(MedmlModel())\n"
    )
    data = tmp_path / "data"
    data.mkdir()
    torch.save(m.encoder.state_dict(), data / "encoder.pt")
    m.prototypes.save(data / "prototypes.npz")
    src = next(model["ws"].mlartifacts.rglob("settings.yaml"))
    shutil.copy(src, data / "settings.yaml")
    use_experiment(model["ws"], "legacy-models")
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(entry),
            artifacts={k: str(data / f) for k, f in (("encoder", "encoder.pt"),
                       ("prototypes", "prototypes.npz"), ("settings", "settings.yaml"))},
        )  # fmt: skip
    stored = list(model["ws"].mlartifacts.rglob("entry.py"))
    assert stored
    marker = tmp_path / "ran"
    for p in stored:
        with p.open("a") as fh:
            fh.write(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    legacy = open_model(f"runs:/{run.info.run_id}/model").model
    assert legacy.prototypes.classes == m.prototypes.classes
    assert not marker.exists()
