"""What the ingest report artifact posts to Prefect (issue 15, item 10): counts and reasons,
never a source path (Prefect keeps artifacts in its own database, outside the workspace).

The markdown is captured at ``create_markdown_artifact``; the pipeline test
(tests/test_pipeline_e2e.py) reads the real artifact back from a Prefect server."""

from __future__ import annotations

import json

from flows import artifacts


def test_ingest_artifact_names_files_by_position_not_path(tmp_path, monkeypatch):
    report = {
        "source": "/exports/DOE_JOHN_1961",
        "counts": {"files": 3, "ingested": 1, "skipped": 0, "quarantined": 2, "scans": 1},
        "files": [
            {"path": "DOE_JOHN_1961/ct/IM1.dcm", "status": "ingested", "scan_id": "ab12"},
            {"path": "DOE_JOHN_1961/ct/IM2.dcm", "status": "quarantined",
             "reason": "duplicate position of DOE_JOHN_1961/ct/IM1.dcm | spacing"},
            {"path": "SMITH_ANN/t1.nii.gz", "status": "quarantined", "reason": "not 3D"},
        ],
    }  # fmt: skip
    path = tmp_path / "ingest-20260101T104200Z.json"
    path.write_text(json.dumps(report))
    posted: list[str] = []
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda md, **kw: posted.append(md))
    artifacts.ingest_report({"report": str(path)})
    (markdown,) = posted
    assert "DOE" not in markdown and "SMITH" not in markdown and "/exports" not in markdown
    assert "| #1 | duplicate position of #0 / spacing |" in markdown
    assert "| #2 | not 3D |" in markdown
    assert "| 3 | 1 | 0 | 2 | 1 |" in markdown and path.name in markdown
