"""Idempotence, change detection, crash safety (a real kill -9), parallel runs, PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pydicom
import pytest
import sqlalchemy as sa

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import ingest
from medml.ingest.fixtures import SeriesSpec, phantom, write_series
from medml.ingest.run import auto_workers
from medml.workspace import Workspace

PG_URL = os.environ.get("MEDML_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _tree(root, n_series: int, n_slices: int, size: int):
    for i in range(n_series):
        write_series(SeriesSpec(phantom(n_slices, size, size, seed=i)), root / f"p{i:02d}" / "ct")
    return root


def _state(ws: Workspace) -> tuple[list[dict], dict[str, bytes]]:
    rows = [
        {k: v for k, v in r.items() if k != "ingest_run"}
        for r in Catalog(ws.catalog_url).list_scans(labelled=False)
    ]
    files = {p.name: p.read_bytes() for p in sorted(ws.volumes.iterdir())}
    return rows, files


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("MEDML_DEID_SECRET", "test-secret-" + uuid.uuid4().hex)


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, secret):
    src = _tree(tmp_path / "src", n_series=10, n_slices=24, size=96)
    ws_killed = Workspace(tmp_path / "killed")
    code = (
        "import sys; from medml.ingest import ingest; from medml.config import IngestConfig;"
        "from medml.workspace import Workspace; from pathlib import Path;"
        "ingest(sys.argv[1], Workspace(Path(sys.argv[2])), None, IngestConfig(workers=1), False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(ws_killed.root)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        vols = ws_killed.volumes
        if vols.exists() and any(p.name.endswith(".nii.gz") for p in vols.iterdir()):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the ingest ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(ws_killed.reports.glob("ingest-*.json")), "the run finished before the kill"
    written_before = len(list(ws_killed.volumes.glob("*.nii.gz")))
    assert 0 < written_before < 10

    ingest(src, ws_killed, None, IngestConfig(workers=1), progress=False)
    ws_clean = Workspace(tmp_path / "clean")
    ingest(src, ws_clean, None, IngestConfig(workers=1), progress=False)
    assert _state(ws_killed) == _state(ws_clean)
    assert len(_state(ws_clean)[0]) == 10
    leftovers = [p for p in ws_killed.root.rglob(".*") if p.name not in {".deid-secret", ".lock"}]
    assert not leftovers


def test_rerun_adds_nothing_and_changed_file_is_detected(tmp_path, secret):
    src = _tree(tmp_path / "src", n_series=3, n_slices=5, size=24)
    ws = Workspace(tmp_path / "ws")
    first = ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    rows, _ = _state(ws)
    mtimes = {p.name: p.stat().st_mtime_ns for p in ws.volumes.iterdir()}
    second = ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    assert second.scan_ids == first.scan_ids and _state(ws)[0] == rows
    assert {p.name: p.stat().st_mtime_ns for p in ws.volumes.iterdir()} == mtimes
    assert len(Catalog(ws.catalog_url).runs()) == 2

    changed = src / "p01" / "ct" / "IM0003.dcm"
    ds = pydicom.dcmread(changed)
    arr = ds.pixel_array.copy()
    arr[5, 5] += 100
    ds.PixelData = arr.tobytes()
    ds.save_as(changed)
    ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    after = {r["scan_id"]: r for r in _state(ws)[0]}
    before = {r["scan_id"]: r for r in rows}
    differ = [s for s in before if before[s]["content_hash"] != after[s]["content_hash"]]
    assert len(differ) == 1 and set(after) == set(before)
    rewritten = [p.name for p in ws.volumes.iterdir() if p.stat().st_mtime_ns != mtimes[p.name]]
    assert rewritten == [f"{differ[0]}.nii.gz"]


def test_parallel_workers_give_the_same_result(tmp_path, secret):
    src = _tree(tmp_path / "src", n_series=4, n_slices=6, size=32)
    ws1, ws2 = Workspace(tmp_path / "one"), Workspace(tmp_path / "two")
    r1 = ingest(src, ws1, None, IngestConfig(workers=1), progress=False)
    r2 = ingest(src, ws2, None, IngestConfig(workers=2), progress=False)
    assert r1.counts == r2.counts and r1.scan_ids == r2.scan_ids
    assert _state(ws1) == _state(ws2)


def _pg_engine():
    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        return engine
    except Exception as exc:  # no driver or no server
        pytest.skip(f"no PostgreSQL answers at {PG_URL}: {type(exc).__name__}: {exc}")


def test_catalog_on_postgresql(tmp_path, secret, monkeypatch):
    engine = _pg_engine()
    schema = f"medml_test_{uuid.uuid4().hex[:12]}"  # parallel runs never share tables
    try:
        catalog = Catalog(PG_URL, schema=schema)
        catalog.upsert_scan({"scan_id": "a", "patient_key": "p", "volume": "volumes/a.nii.gz"})
        catalog.upsert_scan({"scan_id": "a", "patient_key": "p", "volume": "volumes/a.nii.gz",
                             "label": "x"})  # fmt: skip
        catalog.set_splits({"a": "train"})
        assert [r["split"] for r in catalog.list_scans(split="train")] == ["train"]
        catalog.record_run({"run_id": "r1", "source": "s"}, [{"path": "f", "reason": "why"}])
        assert catalog.quarantined("r1")[0]["reason"] == "why"
        catalog.dispose()
        # a whole ingest against it: MEDML_CATALOG_URL points the workspace there
        src = _tree(tmp_path / "src", n_series=2, n_slices=4, size=16)
        ws = Workspace(tmp_path / "ws")
        monkeypatch.setenv("MEDML_CATALOG_URL", PG_URL)
        monkeypatch.setattr("medml.ingest.run.Catalog", lambda url: Catalog(url, schema=schema))
        ingest(src, ws, None, IngestConfig(workers=1), progress=False)
        ingest(src, ws, None, IngestConfig(workers=1), progress=False)
        assert len(Catalog(PG_URL, schema=schema).list_scans(labelled=False)) == 3
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def test_a_pool_only_for_large_inputs_on_idle_cpus():
    assert auto_workers(100, 512, cpus=8, load=0.0) == 1  # small input: in-process
    assert auto_workers(600, 512, cpus=8, load=1.0) == 8  # idle (the load is this process)
    assert auto_workers(600, 512, cpus=8, load=3.0) == 6
    assert auto_workers(600, 512, cpus=2, load=5.0) == 1  # a busy machine: in-process
    assert auto_workers(600, 512, cpus=2, load=0.2) == 2
