"""One writer per workspace: a real second process holds the lock; races on first creation.

Issue 15, item 4: two ingests into one workspace deleted each other's temporaries, overwrote
each other's report, raced on creating the catalog and the de-identification secret.
"""

from __future__ import annotations

import json
import os
import secrets as secrets_module
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from medml.catalog import Catalog
from medml.ingest import ingest
from medml.ingest.deid import load_secret
from medml.ingest.report import IngestReport
from medml.lock import WorkspaceBusy, holder, workspace_lock
from medml.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("MEDML_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

HOLDER = """
import sys
from medml.lock import workspace_lock
url = sys.argv[3] if len(sys.argv) > 3 else None
with workspace_lock(sys.argv[1], sys.argv[2], catalog_url=url):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin (or kills us)
"""


def _hold(root: Path, command: str = "ingest", url: str | None = None) -> subprocess.Popen:
    """A second process holding the workspace lock until its stdin closes."""
    args = [sys.executable, "-c", HOLDER, str(root), command, *([url] if url else [])]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medml.cli", *args],
        capture_output=True, text=True, env=ENV, timeout=timeout,
    )  # fmt: skip


def test_a_second_writer_is_refused_with_who_holds_the_lock(tmp_path):
    ws = Workspace(tmp_path / "ws")
    other = _hold(ws.root)
    try:
        assert holder(ws.root)["pid"] == other.pid
        with pytest.raises(WorkspaceBusy, match=rf"workspace busy: ingest PID {other.pid} "):
            ingest(tmp_path, ws, progress=False)  # the library entry point takes it itself
        src = tmp_path / "src"
        src.mkdir()
        done = _cli("ingest", str(src), "--workspace", str(ws.root))
        assert done.returncode == 1
        assert f"workspace busy: ingest PID {other.pid}" in done.stderr
        assert " UTC" in done.stderr and "--wait" in done.stderr
        assert not ws.reports.exists() or not list(ws.reports.glob("ingest-*.json"))
    finally:
        _release(other)
    with workspace_lock(ws.root, "test"):  # free again once the holder is gone
        pass


def test_wait_queues_behind_the_writer(tmp_path):
    ws = Workspace(tmp_path / "ws")
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not an image")
    other = _hold(ws.root, "train")
    args = [sys.executable, "-m", "medml.cli", "ingest", str(src), "-w", str(ws.root), "--wait"]
    waiting = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)  # the CLI has started and is blocked on the lock
        assert waiting.poll() is None
        assert not ws.reports.exists() or not list(ws.reports.glob("ingest-*.json"))
    finally:
        _release(other)
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert len(list(ws.reports.glob("ingest-*.json"))) == 1


def test_a_killed_writer_leaves_the_workspace_unlocked(tmp_path):
    other = _hold(tmp_path)
    other.send_signal(signal.SIGKILL)
    other.wait(timeout=30)
    with workspace_lock(tmp_path, "ingest"), workspace_lock(tmp_path, "train"):  # re-entrant
        assert holder(tmp_path)["pid"] == os.getpid()
        assert holder(tmp_path)["command"] == "ingest"
    assert holder(tmp_path) is None  # emptied on release


def test_postgresql_catalog_locks_every_host_sharing_it(tmp_path):
    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:
        pytest.skip(f"no PostgreSQL answers at {PG_URL}: {type(exc).__name__}: {exc}")
    url = f"{PG_URL}?application_name=medml-test-{os.getpid()}-{time.time_ns()}"
    other = _hold(tmp_path / "host-a", "ingest", url)
    try:
        # another workspace folder (another host), the same catalog: refused by PostgreSQL
        busy = pytest.raises(WorkspaceBusy, match=rf"ingest PID {other.pid}.*shared catalog")
        with busy, workspace_lock(tmp_path / "host-b", "train", catalog_url=url):
            pass
    finally:
        _release(other)
    with workspace_lock(tmp_path / "host-b", "train", catalog_url=url):
        pass


RACE = """
import sys, time
target = float(sys.argv[2])
from medml.catalog import Catalog
time.sleep(max(0.0, target - time.time()))
Catalog(sys.argv[1]).dispose()
print("ok")
"""


def test_processes_creating_one_catalog_at_once_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    start = time.time() + 4  # every process imports first, then all create at this moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, url, str(start)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(8)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    failures = [err.strip().splitlines()[-1] for p, (_, err) in zip(procs, results) if p.returncode]
    assert not failures, failures
    assert Catalog(url).list_scans(labelled=False) == []


def test_simultaneous_first_calls_agree_on_one_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDML_DEID_SECRET", raising=False)
    # Drawing the secret takes 50 ms here, so that all 200 callers are past "does the file
    # exist?" before the first one has written it: the race the machine would hit by chance.
    real = secrets_module.token_hex
    monkeypatch.setattr(secrets_module, "token_hex", lambda n: time.sleep(0.05) or real(n))
    secret_file = tmp_path / ".deid-secret"
    barrier = threading.Barrier(200)
    secrets: list[bytes] = []

    def first_call() -> None:
        barrier.wait()
        secrets.append(load_secret(secret_file))

    threads = [threading.Thread(target=first_call) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(secrets) == 200 and len(set(secrets)) == 1
    assert secret_file.read_text().strip().encode() == secrets[0]
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".deid-secret"]  # no temporaries left


def test_reports_started_in_the_same_second_keep_their_own_names(tmp_path):
    n = 24
    barrier = threading.Barrier(n)
    paths: list[Path] = []

    def write(i: int) -> None:
        report = IngestReport(source=f"/src/{i}", started="2026-01-01T10:42:00Z")
        barrier.wait()
        paths.append(report.write(tmp_path))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == n
    sources = {json.loads(p.read_text())["source"] for p in paths}
    assert sources == {f"/src/{i}" for i in range(n)}  # nobody overwrote anybody
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_preprocessing_the_catalog_is_a_write_and_takes_the_lock(tmp_path, tiny_settings):
    """It assigns splits to new scans: a concurrent writer must not see half an assignment."""
    from medml.data.dataset import preprocess_catalog

    ws = Workspace(tmp_path / "ws").ensure()
    other = _hold(ws.root)
    try:
        with pytest.raises(WorkspaceBusy, match=rf"ingest PID {other.pid}"):
            preprocess_catalog(ws, tiny_settings.split, tiny_settings.preprocess)
    finally:
        _release(other)
