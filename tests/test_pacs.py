"""The PACS path against a real Orthanc (DICOMweb plugin on, free ports, stopped by PID):
QIDO search + WADO pull, C-FIND + C-GET / C-MOVE, a push to the C-STORE receiver, the SR, a
PACS that is down. One Orthanc for the whole module; each test starts from an empty one."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from medml.ingest.deid import KeyMaker
from medml.pacs import orthanc as local
from medml.pacs.config import PacsConfig
from medml.pacs.inbox import pull_series
from medml.pacs.source import PacsUnavailable, PartialRetrieve, SeriesRef, open_source, series_key
from medml.synth import generate

pytestmark = pytest.mark.skipif(local.missing() is not None, reason=str(local.missing()))

SCP_PORT = local.free_port()  # medml's own SCP for C-MOVE, known to Orthanc as MEDML


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with local.local_orthanc(
        tmp_path_factory.mktemp("orthanc"), peers={"MEDML": ("127.0.0.1", SCP_PORT)}
    ) as server:
        yield server


@pytest.fixture()
def pacs(orthanc):
    """The module's Orthanc, emptied."""
    orthanc.reset()
    return orthanc


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_settings) -> list[list[Path]]:
    """Four synthetic DICOM studies (one CT series each): a list of files per series."""
    out = tmp_path_factory.mktemp("pacs-studies")
    cfg = tiny_settings.synth.model_copy(update={"format": "dicom", "n_patients": 4, "seed": 11})
    generate(cfg, out, progress=False)
    series = sorted({p.parent for p in out.rglob("*.dcm")})
    return [sorted(s.glob("*.dcm")) for s in series]


def stow(server: local.Orthanc, files: list[Path]) -> None:
    DICOMwebClient(server.dicomweb_url).store_instances([pydicom.dcmread(f) for f in files])


def config(server: local.Orthanc, **kw) -> PacsConfig:
    base = {
        "dicomweb_url": server.dicomweb_url,
        "port": server.dicom_port,
        "called_aet": server.aet,
        "listen_host": "127.0.0.1",
        "listen_port": SCP_PORT,
        "modalities": ["CT"],
        "retries": 1,
        "retry_backoff_s": 0.05,
        "timeout_s": 10,
    }
    return PacsConfig(**{**base, **kw})


def uids(files) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def header(files: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(files[0], stop_before_pixels=True)


def test_dicomweb_search_and_pull(pacs, studies, tmp_path):
    for files in studies[:2]:
        stow(pacs, files)
    source = open_source(config(pacs))
    refs = source.search("19000101")
    wanted = {str(header(f).SeriesInstanceUID): f for f in studies[:2]}
    assert {r.series_uid for r in refs} == set(wanted)
    assert all(r.modality == "CT" and r.n_instances == len(wanted[r.series_uid]) for r in refs)
    assert all(len(r.study_date) == 8 for r in refs)
    later = max(r.study_date for r in refs)
    assert {r.study_date for r in source.search(later)} == {later}  # inclusive lower bound
    assert open_source(config(pacs, modalities=["MR"])).search("19000101") == []
    assert source.search("29990101") == []
    ref = refs[0]
    keys = KeyMaker(b"test-secret")
    key = series_key(keys, ref.series_uid)
    folder = pull_series(source, ref, tmp_path / "inbox" / "run-1", key)
    assert folder.name == key
    assert uids(folder.iterdir()) == uids(wanted[ref.series_uid])
    assert all(p.name.endswith(".dcm") and p.stem.isdigit() for p in folder.iterdir())
    assert not list((tmp_path / "inbox" / ".partial").iterdir())


def test_a_short_retrieve_is_never_a_series(pacs, studies, tmp_path):
    stow(pacs, studies[0])
    source = open_source(config(pacs))
    (ref,) = source.search("19000101")
    claimed = SeriesRef(ref.study_uid, ref.series_uid, "CT", ref.study_date, ref.n_instances + 1)
    with pytest.raises(PartialRetrieve, match="retrieved .* of"):
        pull_series(source, claimed, tmp_path / "inbox" / "run-1", "k")
    assert not (tmp_path / "inbox" / "run-1").exists()
    assert not list((tmp_path / "inbox" / ".partial").iterdir())


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_pacs_that_is_down(protocol):
    port = local.free_port()
    cfg = PacsConfig(
        protocol=protocol,
        dicomweb_url=f"http://127.0.0.1:{port}/dicom-web",
        port=port,
        retries=2,
        retry_backoff_s=0.05,
        timeout_s=2,
    )
    start = time.monotonic()
    with pytest.raises(PacsUnavailable, match="unavailable: .* failed 3 times; last error"):
        open_source(cfg).search("19000101")
    assert time.monotonic() - start >= 0.05 + 0.1  # it waited between attempts


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_dimse_find_and_retrieve(pacs, studies, tmp_path, retrieve):
    for files in studies[:2]:
        pacs.upload(files)
    source = open_source(config(pacs, protocol="dimse", retrieve=retrieve))
    refs = source.search("19000101")
    wanted = {str(header(f).SeriesInstanceUID): f for f in studies[:2]}
    assert {r.series_uid for r in refs} == set(wanted)
    assert all(r.n_instances == len(wanted[r.series_uid]) for r in refs)
    assert source.search("29990101") == []
    ref = refs[-1]
    folder = pull_series(source, ref, tmp_path / "run", "k")
    assert uids(folder.iterdir()) == uids(wanted[ref.series_uid])


def push(port: int, files: list[Path], abort: bool = False) -> list[int]:
    """Send files with a pynetdicom storage SCU; return the statuses."""
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title="SCANNER")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDML")
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
    assoc.abort() if abort else assoc.release()
    return statuses


def test_receiver_hands_on_each_quiet_study_with_every_instance(studies, tmp_path):
    from medml.pacs.receiver import StoreReceiver

    keys = KeyMaker(b"test-secret")
    got = []
    receiver = StoreReceiver(
        tmp_path / "inbox", keys, got.append, host="127.0.0.1", port=0, quiet_s=0.5
    )
    with receiver:
        a, b = studies[0], studies[1]
        half = len(a) // 2
        assert push(receiver.port, a[:half]) == [0] * half  # one study over two associations
        assert push(receiver.port, a[half:] + b) == [0] * (len(a) - half + len(b))
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(got) == 2
    by_key = {r.study_key: r for r in got}
    for files in (a, b):
        receipt = by_key[keys.key("study", str(header(files).StudyInstanceUID))]
        assert receipt.stored == len(files) and receipt.failed == 0 and not receipt.aborted
        assert receipt.folder.parent.parent == tmp_path / "inbox"
        assert receipt.folder.name == receipt.study_key
        assert uids(receipt.folder.iterdir()) == uids(files)
    assert receiver.totals == {"received": len(a) + len(b), "stored": len(a) + len(b),
                               "failed": 0, "studies": 2}  # fmt: skip
    assert not list((tmp_path / "inbox" / ".partial").iterdir())


def test_push_to_medml_listen_is_ingested(studies, tmp_path):
    """`medml listen` as a process: a pushed study is ingested once quiet, raw files removed."""
    import json
    import os
    import subprocess
    import sys

    from medml.catalog import Catalog
    from medml.ingest.deid import load_secret
    from medml.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure()
    port = local.free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "medml.cli", "listen", "--workspace", str(ws.root)]
    cmd += ["--port", str(port), "--quiet", "0.5", "--studies", "1"]
    cmd += ["--set", "pacs.listen_host=127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the port to accept associations
            try:
                statuses = push(port, studies[2])
                break
            except AssertionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.3)
        assert statuses == [0] * len(studies[2])
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    totals = json.loads(out.strip().splitlines()[-1])
    n = len(studies[2])
    assert totals == {"received": n, "stored": n, "failed": 0, "studies": 1}
    keys = KeyMaker(load_secret(ws.secret_file))
    scan_id = keys.key("series", str(header(studies[2]).SeriesInstanceUID))
    assert Catalog(ws.catalog_url).get_scan(scan_id) is not None
    assert ws.volume_path(scan_id).exists()
    report = json.loads(max(ws.reports.glob("ingest-*.json")).read_text())
    assert report["counts"]["files"] == n and report["counts"]["ingested"] == n
    inbox = ws.root / "pacs" / "inbox"
    assert not [p for p in inbox.rglob("*") if p.is_file()]  # raw DICOM gone after ingestion
