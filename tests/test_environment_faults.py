"""Environment faults are not data faults (issue 15, item 6): a full workspace stops the run
with exit 1 and quarantines nothing; the rerun, with space, completes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medml.catalog import Catalog
from medml.ingest import ingest
from medml.ingest.faults import EnvironmentFault, environment_fault
from medml.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")


def _noise_tree(src: Path, n: int) -> None:
    """``n`` NIfTI files of incompressible noise, 256 KiB of voxels each."""
    rng = np.random.default_rng(0)
    src.mkdir(parents=True)
    for i in range(n):
        voxels = rng.integers(-32768, 32767, (64, 64, 32), dtype=np.int16)
        nib.save(nib.Nifti1Image(voxels, np.eye(4)), src / f"scan{i:02d}.nii")


def test_a_full_workspace_stops_ingest_and_the_rerun_completes(tmp_path):
    src = tmp_path / "src"
    _noise_tree(src, 8)  # ~2 MiB of volumes for a 1 MiB workspace
    root = tmp_path / "ws"
    _mount_tmpfs(root, "1m")
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDML_DEID_SECRET": uuid.uuid4().hex}
        done = subprocess.run(
            [sys.executable, "-m", "medml.cli", "ingest", str(src), "-w", str(root)],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr[-3000:]
        message = " ".join(done.stderr.split())
        assert "No space left on device writing to the workspace" in message
        assert "quarantined nothing" in message
        ws = Workspace(root)
        assert not list(ws.reports.glob("ingest-*.json"))  # no report calling inputs bad
        catalog = Catalog(ws.catalog_url)
        assert catalog.quarantined() == []
        catalog.dispose()
        subprocess.run(["mount", "-o", "remount,size=16m", str(root)], check=True)
        os.environ["MEDML_DEID_SECRET"] = env["MEDML_DEID_SECRET"]
        try:
            result = ingest(src, ws, progress=False)
        finally:
            del os.environ["MEDML_DEID_SECRET"]
        assert result.counts["ingested"] == 8 and result.counts["quarantined"] == 0
        assert len(list(ws.volumes.glob("*.nii.gz"))) == 8
        assert not list(ws.volumes.glob(".*"))  # the killed run's temporaries are gone
        report = json.loads(result.report_path.read_text())
        assert {f["status"] for f in report["files"]} == {"ingested"}
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_permission_denied_on_the_workspace_is_the_environment_on_an_input_it_is_data(tmp_path):
    """(As root, permissions cannot be denied for real: the classification itself is tested.)"""
    ws = tmp_path / "ws"
    denied = OSError(errno.EACCES, "Permission denied", str(ws / "volumes" / ".x.nii.gz.1-a"))
    assert isinstance(environment_fault(denied, ws), EnvironmentFault)
    on_input = OSError(errno.EACCES, "Permission denied", str(tmp_path / "src" / "a.dcm"))
    assert environment_fault(on_input, ws) is None  # quarantined as unreadable, as before
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert "Disk quota exceeded" in str(environment_fault(wrapped, ws))
    assert environment_fault(ValueError("bad slice"), ws) is None
