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
