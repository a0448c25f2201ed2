"""The ``batch-inference`` flow: new scans in a watch folder -> predictions CSV + summary.

Served nightly by ``medml serve`` over ``orchestration.watch_dir`` (``WS/inbox``). Inputs are cut
into batches of ``orchestration.scans_per_task``; the batches are mapped on the configured task
runner (threads, or Dask for a cluster), and each batch is cached on the model version and its
files' fingerprints, so a nightly run over an unchanged folder predicts nothing twice.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows import artifacts
from flows.runtime import configured, reachable_api, run_step, start, task_runner
from flows.tasks import discover, predict_batch, resolve_model, write_predictions
from medml.config import Settings
from medml.predict.inputs import DOES_NOT_EXIST, NO_SCANS
from medml.workspace import Workspace


@flow(name="predict-batches")
def predict_batches(
    model_uri: str,
    model_tag: str,
    rows_file: str,
    settings: Settings,
    workspace: str,
) -> list[list[dict[str, Any]]]:
    """Map ``predict-batch`` over batches of the rows in ``rows_file`` (``path`` and optional
    ``scan_id``, ``error``). A file in the workspace, not the rows themselves: Prefect keeps a
    flow run's parameters in its own database, outside the workspace, and paths may identify
    patients."""
    rows = json.loads(Path(rows_file).read_text())
    size = settings.orchestration.scans_per_task
    batches = [rows[i : i + size] for i in range(0, len(rows), size)]
    step = configured(predict_batch, settings, Workspace(Path(workspace)), "io", timeout=False)
    futures = step.map(
        model_uri=unmapped(model_uri),
        model_tag=unmapped(model_tag),
        rows=batches,
        settings=unmapped(settings),
        workspace=unmapped(workspace),
    )
    return [f.result() for f in futures]


def predict_rows(
    rows: list[dict[str, Any]], model_uri: str, settings: Settings, ws: Workspace, out: Path
) -> dict[str, Any]:
    """Resolve the model, predict ``rows`` on the configured runner, write ``out``."""
    model = run_step(resolve_model, settings, ws, "io", model_uri=model_uri, workspace=str(ws.root))
    runner = task_runner(settings.orchestration)
    ws.reports.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.NamedTemporaryFile("w", dir=ws.reports, prefix=".inputs-", suffix=".json") as fh,
        reachable_api(settings.orchestration),
    ):
        json.dump(rows, fh)
        fh.flush()
        parts = predict_batches.with_options(task_runner=runner)(
            model["uri"], model["tag"], fh.name, settings, str(ws.root)
        )
    summary = run_step(
        write_predictions, settings, ws, "io", parts=parts, out=str(out), settings=settings
    )
    return {**summary, "model_uri": model["uri"]}


@flow(name="batch-inference", log_prints=True)
def batch_inference_flow(
    inputs: list[str] | None = None,
    model_uri: str | None = None,
    out: str | None = None,
    settings: Settings | None = None,
    workspace: str | None = None,
) -> dict[str, Any]:
    """Predict every NIfTI file / DICOM series under ``inputs`` (default: the watch folder) with
    ``model_uri`` (default: ``models:/<prototypes.model_name>@<prototypes.alias>``)."""
    settings, ws = start(settings, workspace)
    log = get_run_logger()
    o, pc = settings.orchestration, settings.prototypes
    watch = str(o.watch_dir or ws.root / "inbox")
    watching = not inputs or list(inputs) == [watch]  # the nightly run over the watch folder
    inputs = inputs or [watch]
    model_uri = model_uri or f"models:/{pc.model_name}@{pc.alias}"
    rows = run_step(discover, settings, ws, "io", inputs=inputs)
    if watching:  # an empty (or not yet created) watch folder is a quiet night, not an error
        rows = [r for r in rows if r.get("error") not in (NO_SCANS, DOES_NOT_EXIST)]
    if not rows:
        log.info("nothing to predict under %d given paths", len(inputs))
        return {"predictions": None, "n": 0, "errors": 0, "counts": {}, "model_uri": model_uri}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_path = Path(out) if out else ws.reports / "predictions" / f"predictions-{stamp}.csv"
    summary = predict_rows(rows, model_uri, settings, ws, out_path)
    artifacts.predictions(summary, summary["model_uri"])
    log.info("%d inputs, %d errors -> %s", summary["n"], summary["errors"], summary["predictions"])
    return summary
