"""The PACS parts that need no Orthanc: settings, credentials, the ledger, the compose wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from medml.config import load_settings
from medml.pacs.config import PacsConfig, credentials
from medml.pacs.ledger import FAILED, PREDICTED, SENT, Ledger

ROOT = Path(__file__).resolve().parents[1]


def test_pacs_settings_reject_unknown_keys_and_credentials(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pacs: {protocol: dimse, host: pacs.example, port: 104}\n")
    assert load_settings(cfg).pacs.sender == "c-store"
    assert load_settings().pacs.sender == "stow"
    # an unknown key (a password in the config) is refused naming the valid keys
    with pytest.raises(ValueError, match="unknown key pacs.password; valid keys of pacs"):
        load_settings(None, ["pacs.password=x"])
    for bad in ("pacs.protocol=ftp", "pacs.since=2024-01-01"):  # wrong values
        with pytest.raises(ValidationError):
            load_settings(None, [bad])


def test_credentials_come_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("MEDML_PACS_USERNAME", raising=False)
    assert credentials() is None
    monkeypatch.setenv("MEDML_PACS_USERNAME", "u")
    monkeypatch.setenv("MEDML_PACS_PASSWORD", "p")
    assert credentials() == ("u", "p")
    dumped = str(PacsConfig().model_dump())
    assert "'u'" not in dumped and "'p'" not in dumped

    from medml.pacs.dicomweb import session

    assert session(PacsConfig()).auth == ("u", "p")


def test_ledger_and_watermark(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'catalog.db'}")
    assert ledger.watermark("pacs") is None
    ledger.move_watermark("pacs", "20240105")
    ledger.move_watermark("pacs", "20240101")  # never backwards
    assert ledger.watermark("pacs") == "20240105"
    assert ledger.watermark("other") is None
    row = {"scan_id": "s", "predicted_class": "a", "similarity": float("nan")}
    ledger.record("k1", "m/1", PREDICTED, ["s"], [row])
    ledger.record("k2", "m/1", FAILED, [], [], error="quarantined: missing slice")
    ledger.sent("k1", "m/1", ok=False, error="PACS down")
    (k1,) = ledger.entries("m/1", ["k1"]).values()
    assert (k1.state, k1.sends, k1.error) == (PREDICTED, 1, "PACS down")
    assert k1.rows == [{"scan_id": "s", "predicted_class": "a", "similarity": None}]
    ledger.sent("k1", "m/1", ok=True)
    entries = ledger.entries("m/1")
    assert {k: e.state for k, e in entries.items()} == {"k1": SENT, "k2": FAILED}
    assert entries["k1"].sends == 2 and entries["k1"].error is None
    assert ledger.entries("m/2") == {}  # another model version predicts afresh


def test_compose_wires_orthanc_to_the_worker():
    s = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    orthanc, worker = s["orthanc"], s["worker"]
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert "worker" in orthanc["environment"]["ORTHANC__DICOM_MODALITIES"]
    assert worker["depends_on"]["orthanc"]["condition"] == "service_healthy"
    args = " ".join(worker["command"])
    assert "pacs.dicomweb_url=http://orthanc:8042/dicom-web" in args and "pacs.cron=" in args
    assert {"MEDML_PACS_USERNAME", "MEDML_PACS_PASSWORD"} <= set(worker["environment"])
    assert "password" not in args.lower()


def test_error_texts_lose_their_uids():
    from medml.pacs.source import redact

    text = "url: /dicom-web/studies/1.2.826.0.1.3680043.8.498.1/series/1.2.840.10008.5 (x 1.5)"
    assert redact(text) == "url: /dicom-web/studies/<uid>/series/<uid> (x 1.5)"


def test_watermark_moves_only_when_every_series_found_is_finished(tmp_path):
    from medml.pacs.pull import Model, Pulled, advance_watermark
    from medml.workspace import Workspace

    ws = Workspace(tmp_path).ensure()
    model, cfg = Model("models:/m/1", "m", "1"), PacsConfig()
    ledger = Ledger(ws.catalog_url)
    pulled = Pulled(since="20240101", run_dir="", found=["a", "b"], latest="20240110")
    ledger.record("a", model.key, SENT)
    ledger.record("b", model.key, PREDICTED)  # its SR not sent yet
    assert advance_watermark(pulled, {}, model, ws, cfg) is None
    assert advance_watermark(pulled, {}, model, ws, PacsConfig(write_back=False)) == "20240110"
    ledger.record("b", model.key, FAILED, error="quarantined")
    later = Pulled(since="20240110", run_dir="", found=["a", "b", "c"], latest="20240120",
                   failed=[{"key": "c", "error": "retrieved 3 of 9 instances"}])  # fmt: skip
    assert advance_watermark(later, {}, model, ws, cfg) == "20240110"  # c failed to pull
    later.failed, later.found = [], ["a", "b"]
    assert advance_watermark(later, {}, model, ws, cfg) == "20240120"


def test_lookback_and_watermark_take_only_well_formed_study_dates():
    """A PACS may send StudyDate "2024" (which sorts above "20231231") or "2024-01-01": it must
    not become the watermark, nor stop every later pull where lookback parses it."""
    from medml.pacs.pull import _looked_back, _study_date

    assert _looked_back("20260110", 7) == "20260103"
    assert _looked_back("20260110", 0) == "20260110"
    assert _looked_back(None, 7) is None
    assert _looked_back("2024", 7) == "2024"  # kept as found, never a crash
    assert not _study_date("2024") and not _study_date("2024-01-01")
    assert not _study_date("20241301") and _study_date("20240101")
