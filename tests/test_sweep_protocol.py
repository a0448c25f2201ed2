"""The loss comparison end to end on tiny data: a killed and resumed sweep, its MLflow runs,
the sweep flow on two Dask workers, and the MLflow UI in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from medml.config import Settings
from medml.sweep import search, serial, sweep
from medml.tracking import configure
from medml.workspace import Workspace

pytestmark = pytest.mark.slow

LOSSES = ["triplet", "softmax"]
BUDGET = [
    "sweep.folds=2", "sweep.trials=2", "sweep.seeds=1", "sweep.epochs=2",
    "sweep.prune_startup_trials=1", "sweep.prune_warmup_epochs=1",
    # the tiny test split has single-scan classes: MAP@R is undefined there, accuracy is not
    "sweep.metric=accuracy", "sweep.bootstrap=1000",
]  # fmt: skip


def _settings(tiny: Settings) -> Settings:
    from medml.config import load_settings

    settings = load_settings(Path(__file__).parents[1] / "configs" / "tiny.yaml", BUDGET)
    assert settings.model.backbone == tiny.model.backbone
    return settings


def _copy(src: Workspace, dst: Path) -> Workspace:
    shutil.copytree(src.root, dst)
    return Workspace(dst)


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ingested, tiny_settings):
    """A sweep killed in its second trial round, then resumed to the end (serial)."""
    ws = _copy(ingested, tmp_path_factory.mktemp("sweep") / "ws")
    settings = _settings(tiny_settings)
    rounds: list[int] = []

    def killed_in_round_two(jobs):
        rounds.append(len(jobs))
        if len(rounds) == 2:
            raise Killed("the machine went down")
        return serial(jobs)

    with pytest.raises(Killed):
        sweep(settings, ws, LOSSES, mapper=killed_in_round_two)
    result = sweep(settings, ws, LOSSES)
    configure(ws)
    return ws, settings, result, rounds


def _runs(ws: Workspace, settings: Settings):
    configure(ws)
    client = MlflowClient()
    exp = client.get_experiment_by_name(settings.train.experiment)
    return client, exp, client.search_runs([exp.experiment_id], max_results=1000)


def _studies(ws: Workspace, settings: Settings, result) -> dict[str, optuna.Study]:
    storage = search.storage_url(ws)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    return {
        loss: optuna.load_study(study_name=name, storage=storage)
        for loss in LOSSES
        for name in names
        if name.startswith(f"medml-sweep-{loss}-")
    }


def test_every_loss_gets_the_same_budget_and_a_resume_redoes_nothing(finished):
    ws, settings, result, rounds = finished
    assert rounds == [4, 4]  # round one: 2 losses x 2 folds; round two was killed
    assert result.trials == {"triplet": 2, "softmax": 2}
    studies = _studies(ws, settings, result)
    assert len(studies) == 2
    for study in studies.values():
        assert len(study.trials) == 2  # the killed round's trial was resumed, not re-asked
        assert all(t.state in search.FINISHED for t in study.trials)
    _, _, runs = _runs(ws, settings)
    names = [r.info.run_name for r in runs]
    for loss in LOSSES:
        for fold in (1, 2):
            for trial in (1, 2):
                assert names.count(f"{loss} · fold {fold} · trial {trial}") == 1
        assert names.count(f"{loss} · best · seed 1") == 1
    again = sweep(settings, ws, LOSSES)  # finished: nothing new is trained
    _, _, after = _runs(ws, settings)
    assert len(after) == len(runs) and again.parent_run_id == result.parent_run_id
    assert again.table_md.read_text() == result.table_md.read_text()


def test_parent_run_carries_table_verdict_tags_and_figure(finished):
    ws, settings, result, _ = finished
    client, _, runs = _runs(ws, settings)
    parent = client.get_run(result.parent_run_id)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Verdict:** ") and result.verdict.text in note
    assert "| loss | trials (pruned) | CV val MAP@R | epochs |" in note
    assert all(f"| {loss} |" in note or f"| **{loss}** |" in note for loss in LOSSES)
    assert parent.data.tags["medml.winner"] == result.verdict.winner
    assert parent.data.tags["medml.significant"] in {"true", "false"}
    arts = {a.path for a in client.list_artifacts(result.parent_run_id, "comparison")}
    stem = f"comparison/sweep-{result.parent_run_id}"
    assert {f"{stem}.md", f"{stem}.csv", f"{stem}.png"} <= arts
    assert result.figure.read_bytes()[:4] == b"\x89PNG"
    # parent -> one run per loss (its final test metrics) -> the fits of that loss
    by_id = {r.info.run_id: r for r in runs}
    loss_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in loss_runs) == sorted(LOSSES)
    for run in loss_runs:
        assert {
            "compared_test_accuracy",
            "test_accuracy_ci95",
            "cv_val_mean_average_precision_at_r",
        } <= set(run.data.metrics)
        assert run.data.params["loss"] == run.info.run_name
        fits = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert len(fits) == 2 * 2 + 1  # folds x trials + seeds
        assert all(r.info.run_name.startswith(run.info.run_name + " · ") for r in fits)
        assert all("best_val_mean_average_precision_at_r" in r.data.metrics for r in fits
                   if r.data.tags["medml.role"] == "trial")  # fmt: skip
    assert all(by_id[r.info.run_id].info.status == "FINISHED" for r in loss_runs)


def test_two_workers_give_the_same_table_as_one(finished, tmp_path, ingested):
    """The sweep flow on a local Dask cluster of two workers, from the same data, matches the
    serial (and interrupted) sweep: TPE's sequence does not depend on parallelism."""
    from flows.sweep import sweep_flow

    ws, settings, serial_result, _ = finished
    other = _copy(ingested, tmp_path / "ws")
    out = sweep_flow(LOSSES, settings, str(other.root), workers=2)
    assert out["trials"] == {"triplet": 2, "softmax": 2}
    assert Path(out["table_md"]).read_text() == serial_result.table_md.read_text()
    assert out["winner"] == serial_result.verdict.winner
    ours = _studies(ws, settings, serial_result)
    theirs = _studies(other, settings, serial_result)
    for loss in LOSSES:
        assert [t.params for t in ours[loss].trials] == [t.params for t in theirs[loss].trials]
        assert [t.value for t in ours[loss].trials] == [t.value for t in theirs[loss].trials]


# ----------------------------------------------------------------------------- MLflow UI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_ui(finished, tmp_path):
    ws, *_ = finished
    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    log = tmp_path / "mlflow-ui.log"
    cmd = ["mlflow", "ui", "--backend-store-uri", ws.mlflow_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"mlflow ui did not start within 120 s:\n{log.read_text()}")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # its job workers can take long to wind down
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _browser(tmp_path: Path):
    chromium, driver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (chromium.exists() and driver.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, chromedriver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1500,1100",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(driver)), options=options)


def _wait_for_text(browser, needles: list[str], timeout: float = 60) -> str:
    from selenium.webdriver.common.by import By

    deadline, text = time.time() + timeout, ""
    while time.time() < deadline:
        text = browser.find_element(By.TAG_NAME, "body").text
        if all(n in text for n in needles):
            return text
        time.sleep(0.5)
    raise AssertionError(f"never saw {needles} in the page; it showed:\n{text[:3000]}")


def test_mlflow_ui_shows_the_verdict_and_the_per_loss_comparison(finished, mlflow_ui, tmp_path):
    ws, settings, result, _ = finished
    client, exp, runs = _runs(ws, settings)
    browser = _browser(tmp_path)
    shots = Path(os.environ.get("MEDML_SCREENSHOTS") or tmp_path)
    try:
        browser.get(f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{result.parent_run_id}")
        text = _wait_for_text(browser, ["Verdict:", "trials (pruned)", "test accuracy"])
        assert result.verdict.text.split(":")[0] in text
        from selenium.webdriver.common.by import By

        more = browser.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']")
        if more:  # long descriptions are folded after a few lines
            more[0].click()
        text = _wait_for_text(browser, ["Paired comparisons", "Best settings found"])
        assert all(f"{loss} " in text for loss in LOSSES)
        browser.save_screenshot(str(shots / "sweep-parent.png"))
        loss_ids = [r.info.run_id for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]  # fmt: skip
        query = urllib.parse.urlencode(
            {"runs": json.dumps(loss_ids), "experiments": json.dumps([exp.experiment_id])}
        )
        browser.get(f"{mlflow_ui}/#/compare-runs?{query}")
        # the parallel-coordinates plot opens on the compared metric, by the loss param
        text = _wait_for_text(browser, ["compared_test_accuracy", "test_accuracy_ci95", *LOSSES])
        deadline = time.time() + 30
        while time.time() < deadline and not browser.find_elements(By.CSS_SELECTOR, ".parcoords"):
            time.sleep(0.5)
        assert browser.find_elements(By.CSS_SELECTOR, ".parcoords"), "no parallel-coordinates plot"
        browser.save_screenshot(str(shots / "sweep-compare.png"))
    finally:
        browser.quit()
    assert (shots / "sweep-compare.png").stat().st_size > 10_000
