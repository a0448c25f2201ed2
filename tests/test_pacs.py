"""The PACS path against a real Orthanc (DICOMweb plugin on, free ports, stopped by PID):
QIDO search + WADO pull, C-FIND + C-GET / C-MOVE, a push to the C-STORE receiver, the SR, a
PACS that is down. One Orthanc for the whole module; each test starts from an empty one."""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path

import pydicom
import pytest
from conftest import untrained_copy
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
    n = len(a) + len(b)
    assert receiver.totals == {"received": n, "stored": n, "failed": 0, "studies": 2}
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


# ----------------------------------------------------------------------------- SR and the flow

NAME = "medml-pacs"


@pytest.fixture(scope="module")
def model_ws(tmp_path_factory, ingested, tiny_settings):
    """A workspace with a 1-epoch model registered as NAME@champion (prototypes from train)."""

    import numpy as np

    from medml.fewshot.prototypes import select_support
    from medml.registry.package import package_run
    from medml.registry.register import catalog_pairs, register_prototypes
    from medml.tracking import configure
    from medml.train import train

    ws = untrained_copy(ingested, tmp_path_factory.mktemp("pacs-model") / "ws")
    settings = tiny_settings.model_copy(
        update={"train": tiny_settings.train.model_copy(update={"epochs": 1})}
    )
    configure(ws)
    fitted = train(settings, ws, progress=False)  # no evaluation: only a model is needed
    model_uri = package_run(fitted.run_id, settings, ws, fitted.checkpoint)
    pairs = catalog_pairs(ws, "train")
    picks = select_support([lab for _, lab in pairs], 2, np.random.default_rng(0))
    register_prototypes(model_uri, [pairs[i] for i in picks], NAME, "champion", workspace=ws)
    return ws


@pytest.fixture()
def flow_ws(model_ws, tmp_path):
    """A private copy of the model workspace (its catalog and ledger change here)."""
    import shutil

    from medml.workspace import Workspace

    shutil.copytree(model_ws.root, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def flow_settings(tiny_settings, server, **pacs):
    p = config(server, **pacs).model_dump()
    return tiny_settings.model_copy(
        update={
            "pacs": PacsConfig(**p),
            "prototypes": tiny_settings.prototypes.model_copy(update={"model_name": NAME}),
            "predict": tiny_settings.predict.model_copy(update={"workers": 0}),
        }
    )


def sr_series(server) -> list[pydicom.Dataset]:
    """Every SR instance on the PACS, retrieved over WADO-RS."""
    client = DICOMwebClient(server.dicomweb_url)
    found = client.search_for_series(search_filters={"Modality": "SR"})
    out = []
    for row in found:
        ref = pydicom.Dataset.from_json(row)
        out += client.retrieve_series(ref.StudyInstanceUID, ref.SeriesInstanceUID)
    return out


def test_sr_sent_with_c_store_reads_back(pacs, studies):
    from medml.pacs.source import open_sender
    from medml.pacs.sr import build_sr, read_sr

    pacs.upload(studies[0])
    evidence = [pydicom.dcmread(f, stop_before_pixels=True) for f in studies[0]]
    row = {"scan_id": "s1", "predicted_class": "CT-2", "similarity": 0.75, "margin": 0.2,
           "prob_CT-0": 0.1, "prob_CT-1": 0.2, "prob_CT-2": 0.7, "unknown": True}  # fmt: skip
    sr = build_sr(evidence, [row], "m", "4", "key")
    open_sender(config(pacs, protocol="dimse")).store([sr])
    (back,) = sr_series(pacs)
    said = read_sr(back)
    assert said["series"] == {str(evidence[0].SeriesInstanceUID)}
    assert said["study"] == str(evidence[0].StudyInstanceUID)
    assert back.PatientID == evidence[0].PatientID  # filed with the patient's study
    (group,) = said["groups"]
    assert group["finding"] == "CT-2" and group["unknown"] is True
    assert group["measurements"]["p-CT-2"] == pytest.approx(0.7)
    assert group["instances"] == {str(ds.SOPInstanceUID) for ds in evidence}


class Recorder:
    """The message of every log record made while the block runs, whatever handlers Prefect
    installs (a record factory sees each record a logger at its level creates); the root logger
    at INFO and medml's at DEBUG (Prefect resets levels when a flow starts)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self) -> Recorder:
        self.levels = {n: logging.getLogger(n).level for n in ("", "medml")}
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("medml").setLevel(logging.DEBUG)
        self.factory = logging.getLogRecordFactory()

        def record(*args, **kwargs):
            rec = self.factory(*args, **kwargs)
            self.lines.append(f"{rec.name}: {rec.getMessage()}")
            return rec

        logging.setLogRecordFactory(record)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.setLogRecordFactory(self.factory)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def test_scheduled_flow_end_to_end(pacs, studies, flow_ws, tiny_settings):
    with Recorder() as logs:
        _scheduled_flow_end_to_end(pacs, studies, flow_ws, tiny_settings)
    secrets = {str(header(f).StudyInstanceUID) for f in studies}
    secrets |= {str(header(f).SeriesInstanceUID) for f in studies}
    secrets |= {str(header(f).PatientID) for f in studies}
    text = "\n".join(logs.lines)
    assert "medml.pacs.pull: PACS pacs since" in text and "PACS run:" in text  # recorded
    assert not any(s in text for s in secrets)  # and name no UID or patient


def _scheduled_flow_end_to_end(pacs, studies, flow_ws, tiny_settings):
    """A killed run resumes, a second run sends nothing new, a new study is picked up, and each
    SR read back from Orthanc references its series and says what the ledger predicted."""
    from flows.pacs import pacs_flow
    from medml.pacs import pull as steps
    from medml.pacs.ledger import PREDICTED, SENT, Ledger
    from medml.pacs.sr import read_sr

    ws = flow_ws
    settings = flow_settings(tiny_settings, pacs)
    for files in studies[:3]:
        stow(pacs, files)
    # A run killed after predicting, before sending: the ledger has the predictions.
    from medml.tracking import configure

    configure(ws)
    model = steps.resolve_model(f"models:/{NAME}@champion")
    pulled = steps.pull_new(settings.pacs, ws, model.key)
    ingested = steps.ingest_pulled(pulled, ws, settings.ingest)
    out = ws.reports / "pacs" / "killed.csv"
    assert steps.predict_pulled(pulled, ingested, model, ws, settings.predict, out)["series"] == 3
    ledger = Ledger(ws.catalog_url)
    assert {e.state for e in ledger.entries(model.key).values()} == {PREDICTED}
    assert ledger.watermark("pacs") is None and sr_series(pacs) == []

    first = pacs_flow(settings=settings, workspace=str(ws.root))
    assert (first["pulled"], first["predicted"], first["sent"]) == (3, 0, 3)  # resumed: sent only
    dates = sorted(str(header(f).StudyDate) for f in studies[:3])
    assert first["watermark"] == ledger.watermark("pacs") == dates[-1]

    second = pacs_flow(settings=settings, workspace=str(ws.root))
    assert (second["pulled"], second["sent"], second["already_done"]) == (0, 0, second["found"])
    assert len(sr_series(pacs)) == 3

    new = [pydicom.dcmread(f) for f in studies[3]]
    for ds in new:  # a study of the watermark's day, arriving after the last run
        ds.StudyDate = dates[-1]
    DICOMwebClient(pacs.dicomweb_url).store_instances(new)
    third = pacs_flow(settings=settings, workspace=str(ws.root))
    assert (third["pulled"], third["predicted"], third["sent"]) == (1, 1, 1)

    entries = ledger.entries(model.key)
    assert len(entries) == 4 and {e.state for e in entries.values()} == {SENT}
    assert all(e.sends == 1 for e in entries.values())
    keys = steps.keymaker(ws)
    for back in sr_series(pacs):
        said = read_sr(back)
        (series_uid,) = said["series"]
        entry = entries[series_key(keys, series_uid)]
        (group,) = said["groups"]
        assert group["finding"] == entry.rows[0]["predicted_class"]
        assert group["measurements"]["similarity"] == pytest.approx(entry.rows[0]["similarity"])
        assert back.ContentSequence is not None and back.Manufacturer == "medml"
    # de-identified workspace: no UID or patient attribute in the ledger, reports or results
    secrets = {str(header(f).StudyInstanceUID) for f in studies} | {
        str(header(f).PatientID) for f in studies
    }
    secrets |= {str(header(f).SeriesInstanceUID) for f in studies}
    stored = [ws.catalog_url.removeprefix("sqlite:///"), *ws.reports.rglob("*.*")]
    for path in stored + list((ws.root / "prefect-results").rglob("*")):
        text = Path(path).read_bytes() if Path(path).is_file() else b""
        assert not any(s.encode() in text for s in secrets), path
    assert not [p for p in (ws.root / "pacs" / "inbox").rglob("*") if p.is_file()]


def test_write_back_off_sends_nothing(pacs, studies, flow_ws, tiny_settings):
    from flows.pacs import pacs_flow

    stow(pacs, studies[0])
    settings = flow_settings(tiny_settings, pacs, write_back=False)
    result = pacs_flow(settings=settings, workspace=str(flow_ws.root))
    assert (result["predicted"], result["sent"]) == (1, 0)
    assert sr_series(pacs) == []
    assert result["watermark"] == str(header(studies[0]).StudyDate)


def test_flow_with_the_pacs_down_keeps_the_watermark(flow_ws, tiny_settings):
    from flows.pacs import pacs_flow
    from medml.pacs.ledger import Ledger

    port = local.free_port()
    down = local.Orthanc(port, port, "ORTHANC", 0)
    settings = flow_settings(tiny_settings, down)
    with pytest.raises(PacsUnavailable, match="unavailable"):
        pacs_flow(settings=settings, workspace=str(flow_ws.root))
    assert Ledger(flow_ws.catalog_url).watermark("pacs") is None


def test_serve_has_the_pacs_deployment_when_scheduled(tmp_path, tiny_settings):
    from flows.serve import build_deployments
    from medml.workspace import Workspace

    cron = tiny_settings.model_copy(update={"pacs": PacsConfig(cron="*/10 * * * *")})
    deps = {f"{d.flow_name}/{d.name}": d for d in build_deployments(cron, Workspace(tmp_path))}
    pacs = deps["pacs/scheduled"]
    assert pacs.schedules[0].schedule.cron == "*/10 * * * *"
    assert pacs.entrypoint == "flows.pacs.pacs_flow"
    assert pacs.parameters["settings"]["pacs"]["cron"] == "*/10 * * * *"
    assert "pacs/scheduled" not in {
        f"{d.flow_name}/{d.name}" for d in build_deployments(tiny_settings, Workspace(tmp_path))
    }


def test_a_stopped_receiver_leaves_nothing_behind(studies, tmp_path):
    """Instances stored before a receiver stopped are handed on by the next one at its start."""
    from medml.pacs.receiver import StoreReceiver

    keys, got = KeyMaker(b"test-secret"), []
    first = StoreReceiver(tmp_path, keys, got.append, host="127.0.0.1", port=0, quiet_s=30)
    with first:
        assert push(first.port, studies[1]) == [0] * len(studies[1])
    assert got == [] and len(list((tmp_path / ".partial").iterdir())) == 1
    second = StoreReceiver(tmp_path, keys, got.append, host="127.0.0.1", port=0, quiet_s=30)
    with second:
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.1)
    (receipt,) = got
    assert receipt.study_key == keys.key("study", str(header(studies[1]).StudyInstanceUID))
    assert receipt.stored == len(studies[1]) and uids(receipt.folder.iterdir()) == uids(studies[1])


def test_cli_pacs_pull_ingest_only(pacs, studies, tmp_path):
    import json

    from typer.testing import CliRunner

    from medml.cli import app

    stow(pacs, studies[0])
    ws = tmp_path / "ws"
    args = ["pacs", "pull", "--ingest-only", "--workspace", str(ws)]
    args += ["--set", f"pacs.dicomweb_url={pacs.dicomweb_url}", "--set", "pacs.modalities=[CT]"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert (out["found"], out["pulled"], out["scans"], out["ingest_failed"]) == (1, 1, 1, 0)
    assert json.loads(Path(out["report"]).read_text())["counts"]["ingested"] == len(studies[0])
    bad = CliRunner().invoke(app, [*args, "--since", "2024-01-01"])
    assert bad.exit_code == 2 and "YYYYMMDD" in bad.output


def test_lookback_finds_a_prior_that_reached_the_pacs_after_the_watermark(pacs, studies, tmp_path):
    """A prior imported from elsewhere carries an old study date: searching from the watermark
    misses it, ``pacs.lookback_days`` finds it (and the ledger would skip what is done)."""
    from medml.pacs import pull as steps
    from medml.pacs.ledger import Ledger
    from medml.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure()
    recent = str(header(studies[0]).StudyDate)
    stow(pacs, studies[0])
    prior = [pydicom.dcmread(f) for f in studies[1]]
    old = datetime.datetime.strptime(recent, "%Y%m%d") - datetime.timedelta(days=30)
    for ds in prior:
        ds.StudyDate = old.strftime("%Y%m%d")
    DICOMwebClient(pacs.dicomweb_url).store_instances(prior)
    Ledger(ws.catalog_url).move_watermark("pacs", recent)  # a run before the prior arrived

    plain = steps.pull_new(config(pacs), ws)
    assert plain.since == recent and len(plain.found) == 1
    looked = steps.pull_new(config(pacs, lookback_days=45), ws)
    assert looked.since == (old - datetime.timedelta(days=15)).strftime("%Y%m%d")
    assert len(looked.found) == 2 and not looked.failed
