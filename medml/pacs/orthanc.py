"""A throwaway local Orthanc: a temporary JSON config on free ports, the DICOMweb plugin on,
storage in a given folder, started as a subprocess and stopped by PID.

For tests, ``bench/pacs.py`` and trying the PACS path on a laptop (no root needed: Debian's
``orthanc`` and ``orthanc-dicomweb`` packages, or any ``Orthanc`` binary on the PATH).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")


def binary() -> str | None:
    """The ``Orthanc`` executable (PATH, then /usr/sbin), or None."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin library, or None."""
    for folder in map(Path, PLUGIN_DIRS):
        for lib in sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []:
            return lib
    return None


def missing() -> str | None:
    """Why a local Orthanc cannot start here, or None when it can."""
    if binary() is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Orthanc:
    """A running Orthanc: its REST and DICOMweb URLs, DICOM port and AE title."""

    http_port: int
    dicom_port: int
    aet: str
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, paths: Sequence[Path]) -> int:
        """POST DICOM files to the REST API (``/instances``); return how many were stored."""
        with requests.Session() as s:
            for p in paths:
                s.post(f"{self.url}/instances", data=Path(p).read_bytes(), timeout=30)
        return len(paths)

    def get(self, path: str) -> object:
        """GET a REST resource as JSON."""
        return requests.get(f"{self.url}{path}", timeout=30).json()

    def reset(self) -> None:
        """Delete every patient (and so every study) this Orthanc holds."""
        for patient in self.get("/patients"):
            requests.delete(f"{self.url}/patients/{patient}", timeout=30)


@contextmanager
def local_orthanc(
    folder: Path, peers: dict[str, tuple[str, int]] | None = None, timeout_s: float = 30.0
) -> Iterator[Orthanc]:
    """Run Orthanc with storage under ``folder`` while the block runs.

    ``peers`` maps AE titles to ``(host, port)``: the modalities Orthanc may C-MOVE to and
    accepts C-GET/C-FIND/C-STORE from.
    """
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "medml-local",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {aet: [aet, host, port] for aet, (host, port) in (peers or {}).items()},
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "SaveJobs": False,
        "HttpServerThreads": 4,
        "ConcurrentJobs": 2,
    }
    cfg_path = folder / "orthanc.json"
    cfg_path.write_text(json.dumps(config, indent=1))
    log = (folder / "orthanc.log").open("ab")
    env = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK: no Nagle delay per DIMSE message
    proc = subprocess.Popen(
        [binary(), str(cfg_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    server = Orthanc(http_port, dicom_port, "ORTHANC", proc.pid)
    try:
        _wait(server, proc, folder, timeout_s)
        yield server
    finally:
        _stop(proc)
        log.close()


def _wait(server: Orthanc, proc: subprocess.Popen, folder: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/system", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            tail = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Orthanc did not answer at {server.url} in {timeout_s:.0f}s")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, 9)
        proc.wait(timeout=5)
