"""The ``pacs`` flow: new studies on the PACS -> predictions -> one DICOM SR per series, sent back.

Served by ``medml serve`` as ``pacs/scheduled`` on ``pacs.cron`` (when set); ``medml pacs pull``
runs it once. Steps: pin ``models:/NAME@champion`` to its version -> search from the watermark
and pull what that version has not finished (atomic inbox) -> ingest (same rules and
de-identification as any folder) -> predict -> SR per series and send (STOW-RS or C-STORE) ->
move the watermark if every series found is finished. Idempotent through the ledger: a killed
run is resumed by the next one (predicted series are only sent, sent ones skipped).

No step caches: each asks the PACS or the ledger what is new. Steps pass keys and paths only;
original UIDs stay inside the pull and send steps (``medml.pacs.pull``).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.runtime import run_step, start
from medml.config import Settings
from medml.pacs import pull as steps
from medml.tracking import configure
from medml.workspace import Workspace


def _ws(workspace: str) -> Workspace:
    ws = Workspace(Path(workspace)).ensure()
    configure(ws)
    return ws


@task(name="pacs-model", cache_policy=NO_CACHE)
def pin_model(model_uri: str, workspace: str) -> dict[str, str]:
    """The model version the alias points at now (one version for the whole run)."""
    _ws(workspace)
    return asdict(steps.resolve_model(model_uri))


@task(name="pacs-pull", cache_policy=NO_CACHE)
def pull(settings: Settings, workspace: str, model_key: str, since: str | None) -> dict[str, Any]:
    """Search the PACS and retrieve the series this model version has not finished."""
    return asdict(steps.pull_new(settings.pacs, _ws(workspace), model_key, since))


@task(name="pacs-ingest", cache_policy=NO_CACHE)
def ingest(pulled: dict[str, Any], settings: Settings, workspace: str) -> dict[str, Any]:
    """Ingest the run's inbox folder."""
    return steps.ingest_pulled(steps.Pulled(**pulled), _ws(workspace), settings.ingest)


@task(name="pacs-predict", cache_policy=NO_CACHE)
def predict(
    pulled: dict[str, Any],
    ingested: dict[str, Any],
    model: dict[str, str],
    settings: Settings,
    workspace: str,
    out: str,
) -> dict[str, Any]:
    """Predict the new series; record each in the ledger."""
    return steps.predict_pulled(
        steps.Pulled(**pulled),
        ingested,
        steps.Model(**model),
        _ws(workspace),
        settings.predict,
        Path(out),
    )


@task(name="pacs-send", cache_policy=NO_CACHE)
def send(
    pulled: dict[str, Any], model: dict[str, str], settings: Settings, workspace: str
) -> dict[str, Any]:
    """One SR per predicted, unsent series, sent back to the PACS (unless write_back is off)."""
    return steps.send_reports(
        steps.Pulled(**pulled), steps.Model(**model), _ws(workspace), settings.pacs
    )


@task(name="pacs-watermark", cache_policy=NO_CACHE)
def watermark(
    pulled: dict[str, Any],
    sent: dict[str, Any],
    ingested: dict[str, Any],
    model: dict[str, str],
    settings: Settings,
    workspace: str,
    table: str,
) -> dict[str, Any]:
    """Write the run's per-series table; move the watermark if everything found is finished."""
    ws, p, m = _ws(workspace), steps.Pulled(**pulled), steps.Model(**model)
    steps.write_run_table(p, ingested, m, ws, Path(table))
    return {"watermark": steps.advance_watermark(p, sent, m, ws, settings.pacs)}


@flow(name="pacs", log_prints=True)
def pacs_flow(
    since: str | None = None,
    model_uri: str | None = None,
    settings: Settings | None = None,
    workspace: str | None = None,
) -> dict[str, Any]:
    """One PACS cycle; returns counts (JSON), the run's files and the watermark after it."""
    settings, ws = start(settings, workspace)
    log = get_run_logger()
    root = str(ws.root)
    uri = model_uri or steps.default_model_uri(settings)
    model = run_step(pin_model, settings, ws, "io", model_uri=uri, workspace=root)
    # PACS steps retry inside the library (pacs.retries), so not again here ("compute")
    pulled = run_step(
        pull,
        settings,
        ws,
        "compute",
        settings=settings,
        workspace=root,
        model_key=f"{model['name']}/{model['version']}",
        since=since,
    )
    ingested = run_step(
        ingest, settings, ws, "compute", pulled=pulled, settings=settings, workspace=root
    )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = ws.reports / "pacs" / f"predictions-{stamp}.csv"
    predicted = run_step(
        predict,
        settings,
        ws,
        "compute",
        pulled=pulled,
        ingested=ingested,
        model=model,
        settings=settings,
        workspace=root,
        out=str(out),
    )
    sent = run_step(
        send,
        settings,
        ws,
        "compute",
        pulled=pulled,
        model=model,
        settings=settings,
        workspace=root,
    )
    table = ws.reports / "pacs" / f"series-{stamp}.csv"
    mark = run_step(
        watermark,
        settings,
        ws,
        "compute",
        pulled=pulled,
        sent=sent,
        ingested=ingested,
        model=model,
        settings=settings,
        workspace=root,
        table=str(table),
    )
    result = {
        "model": f"{model['name']}/{model['version']}",
        "since": pulled["since"],
        "found": len(pulled["found"]),
        "pulled": len(pulled["series"]),
        "already_done": pulled["skipped"],
        "pull_failed": len(pulled["failed"]),
        "deferred": pulled["deferred"],
        "predicted": predicted["series"],
        "errors": predicted["errors"],
        "sent": sent["sent"],
        "send_failed": len(sent["failed"]),
        "watermark": mark["watermark"],
        "predictions": predicted["predictions"],
        "series_table": str(table),
        "ingest_report": ingested["report"],
    }
    create_table_artifact(
        [{k: v for k, v in result.items() if not isinstance(v, str) or k == "model"}],
        key="pacs-run",
        description="PACS cycle: counts only (no identifiers)",
    )
    log.info("PACS run: %s", {k: result[k] for k in ("found", "pulled", "predicted", "sent")})
    if sent["failed"]:
        log.warning("%d SR sends failed; retried next run", len(sent["failed"]))
    return result
