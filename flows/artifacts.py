"""Prefect artifacts (shown on the flow run page and under Artifacts in the UI).

Created by the flow from each step's result, so a run whose steps came from the cache shows them
too. Keys are stable: the UI keeps every version of ``ingest-report``, ``evaluation``, ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from medml.ingest.report import ReportPositions

MAX_ROWS = 50  # of quarantined files or errors listed in markdown; the files hold them all


def ingest_report(result: dict[str, Any]) -> None:
    """Counts and quarantine reasons of one ingest, with no source path in them.

    Prefect keeps artifacts in its own database (``PREFECT_HOME``, outside the workspace), and
    source paths name patients as often as not (``DOE_JOHN/CT``). So a quarantined file is
    named by its position in the report (``#12`` is ``files[12]`` of the workspace's report,
    the one place with source paths) and any report path quoted in a reason is replaced the
    same way; the source folder is not named.
    """
    report = json.loads(Path(result["report"]).read_text())
    counts = report.get("counts", {})
    files = report.get("files", [])
    lines = [
        "# Ingest",
        "",
        "| " + " | ".join(counts) + " |",
        "|" + "---|" * len(counts),
        "| " + " | ".join(str(v) for v in counts.values()) + " |",
        "",
        f"Report (in the workspace, with the source paths): `{Path(result['report']).name}`",
    ]
    quarantined = [(i, f) for i, f in enumerate(files) if f.get("status") == "quarantined"]
    if quarantined:
        positions = ReportPositions([f["path"] for f in files])
        lines += ["", f"## Quarantined ({len(quarantined)})", "", "| file | reason |", "|---|---|"]
        lines += [
            f"| #{i} | {positions.hide(f.get('reason', ''), f['path']).replace('|', '/')} |"
            for i, f in quarantined[:MAX_ROWS]
        ]
        if len(quarantined) > MAX_ROWS:
            lines.append(f"| ... | {len(quarantined) - MAX_ROWS} more in the report |")
    create_markdown_artifact(
        "\n".join(lines), key="ingest-report", description="files ingested/skipped/quarantined"
    )


def _flat(metrics: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        elif key != "run_id":
            rows.append({"metric": f"{prefix}{key}", "value": value})
    return rows


def evaluation(train: dict[str, Any]) -> None:
    """The test metrics of a training run (the train/evaluate JSON contract)."""
    create_table_artifact(
        _flat(train["metrics"]),
        key="evaluation",
        description=f"test metrics of MLflow run {train['run_id']}",
    )


def sweep(result: dict[str, Any]) -> None:
    """The loss comparison's table and verdict, as the parent MLflow run's description has them."""
    table_md = Path(result["table_md"])
    if table_md.exists():
        create_markdown_artifact(
            table_md.read_text(),
            key="sweep-table",
            description=f"loss comparison under MLflow run {result['parent_run_id']}",
        )


def predictions(summary: dict[str, Any], model_uri: str) -> None:
    """Class counts and errors of one batch inference; the failed inputs by position (the
    prediction file's row) and scan id with their reasons, never by path."""
    counts = summary.get("counts", {})
    rows = [{"class": c, "scans": n} for c, n in sorted(counts.items())]
    rows.append({"class": "error", "scans": summary.get("errors", 0)})
    create_table_artifact(
        rows, key="prediction-summary", description=f"{summary['n']} inputs with {model_uri}"
    )
    create_markdown_artifact(predictions_markdown(summary, model_uri), key="predictions")


def predictions_markdown(summary: dict[str, Any], model_uri: str) -> str:
    """The ``predictions`` artifact's text: counts, then the failed inputs (first MAX_ROWS)."""
    lines = [
        f"# Predictions with `{model_uri}`",
        "",
        f"{summary['n']} inputs, {summary['errors']} errors: `{summary['predictions']}`",
    ]
    if "accuracy_vs_labels" in summary and summary["accuracy_vs_labels"] is not None:
        lines.append(f"\nAccuracy against catalog labels: {summary['accuracy_vs_labels']:.3f}")
    failures = summary.get("failures") or []
    if failures:
        lines += [
            "",
            f"## Failed inputs ({summary['errors']})",
            "",
            "Position is the row of the prediction file, whose `input` column names the input.",
            "",
            "| position | scan id | reason |",
            "|---|---|---|",
        ]
        lines += [
            f"| {f['position']} | {f.get('scan_id') or '-'} | {_cell(f['error'])} |"
            for f in failures[:MAX_ROWS]
        ]
        if summary["errors"] > min(len(failures), MAX_ROWS):
            shown = min(len(failures), MAX_ROWS)
            lines.append(f"| ... | | {summary['errors'] - shown} more in the prediction file |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
