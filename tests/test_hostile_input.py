"""Careless and hostile input (issue 15): YAML bombs and errors, label CSVs, header values in
exception texts, file names that are not UTF-8."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medml.catalog import Catalog
from medml.cli import app
from medml.config import ConfigError, load_settings
from medml.ingest import ingest
from medml.ingest.fixtures import SeriesSpec, phantom, write_series
from medml.ingest.labels import LabelError, LabelIndex
from medml.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"{b}: &{b} [{','.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")),
        "synth: {weightings: *i}",
    ]
)


def _limited(limit_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def _cli(*args: str, limit_mb: int = 1500, timeout: float = 60) -> subprocess.CompletedProcess:
    """The command line in a subprocess, its address space capped (a bomb cannot take the
    machine down with the test)."""
    return subprocess.run(
        [sys.executable, "-m", "medml.cli", *args], capture_output=True, text=True, env=ENV,
        timeout=timeout, preexec_fn=_limited(limit_mb << 20),
    )  # fmt: skip


def _text(stderr: str) -> str:
    """The error message without the box typer draws around it."""
    return " ".join(stderr.replace("│", " ").split())


# ----------------------------------------------------------------------------- YAML


def test_a_billion_laughs_config_is_refused_fast_and_small(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert bomb.stat().st_size < 1024
    started = time.monotonic()
    done = _cli("synth", "covid-ct", "--out", str(tmp_path / "out"), "--config", str(bomb))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "aliases expand to" in done.stderr and "bomb.yaml" in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out").exists()


def test_yaml_errors_exit_2_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n   lr: [\n")
    done = CliRunner().invoke(app, ["synth", "covid-ct", "-o", str(tmp_path / "o"), "-c", str(bad)])
    assert done.exit_code == 2
    assert "bad.yaml, line 3" in _text(done.output)
    with pytest.raises(ConfigError, match="--set train.epochs, line 1"):
        load_settings(None, ["train.epochs=[1,"])


def test_oversized_and_deep_configs_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_settings(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 10_000 + "]" * 10_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not a usable YAML"):
        load_settings(deep)
    anchors = tmp_path / "anchors.yaml"  # a config may still use a few anchors
    anchors.write_text("model: &m {embedding_dim: 8, head_hidden: 8}\nloss: {name: triplet}\n")
    assert load_settings(anchors).model.embedding_dim == 8


# ----------------------------------------------------------------------------- labels


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("label", "why"),
    [('"two\nlines"', "U\\+000A"), ("tab\there", "U\\+0009"), ("x" * 65, "longer than 64")],
)
def test_labels_with_control_characters_or_too_long_are_refused(tmp_path, label, why):
    path = _csv(tmp_path, f"path,label\na/b,ok\nc/d,{label}\n")
    with pytest.raises(LabelError, match=rf"labels.csv, line 3: .*{why}"):
        LabelIndex.from_csv(path)


def test_conflicting_duplicate_rows_name_both_lines(tmp_path):
    path = _csv(tmp_path, "series_uid,label\n1.2.3,mild\n1.2.4,severe\n1.2.4,severe\n1.2.3,none\n")
    with pytest.raises(LabelError, match=r"lines 2 and 5 give the same series_uid") as err:
        LabelIndex.from_csv(path)
    assert "1.2.3" not in str(err.value)  # the rows are named, not the identifier
    src = tmp_path / "src"
    src.mkdir()
    done = CliRunner().invoke(
        app, ["ingest", str(src), "--labels", str(path), "-w", str(tmp_path / "ws")]
    )
    assert done.exit_code == 2 and "lines 2 and 5" in _text(done.output)


def test_a_patient_whose_studies_differ_labels_no_scan_by_patient_alone(tmp_path):
    path = _csv(tmp_path, "patient_id,study_uid,label\nP1,S1,mild\nP1,S2,severe\n")
    index = LabelIndex.from_csv(path)
    assert index.find(study_uid="S2", patient_id="P1")["label"] == "severe"
    assert index.find(study_uid="S9", patient_id="P1") is None  # not the last row's label


# ----------------------------------------------------------------------------- PHI in texts


def test_header_values_never_reach_reasons_or_logs(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MEDML_DEID_SECRET", "test")
    src = tmp_path / "src"
    paths = write_series(SeriesSpec(phantom(3, 16, 16)), src / "ct")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280030, "LO", "DOE^JOHN\\1.0")  # PixelSpacing that is a name
        ds.save_as(path)
    result = ingest(src, Workspace(tmp_path / "ws"), progress=False)
    report = result.report_path.read_text()
    assert result.counts["quarantined"] == 3
    assert "could not convert string to float" in report  # the reason is still useful
    assert "DOE" not in report and "DOE" not in caplog.text
    assert "DOE" not in json.dumps(Catalog(Workspace(tmp_path / "ws").catalog_url).quarantined())


# ----------------------------------------------------------------------------- file names


def test_file_names_that_are_not_utf8_are_ingested_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDML_DEID_SECRET", "test")
    src = tmp_path / "src"
    names = {b"caf\xe9": "caf\\xe9", b"\xff\xfe-bad": "\\xff\\xfe-bad"}  # Latin-1, invalid
    rng = np.random.default_rng(0)
    for i, raw in enumerate(names):
        folder = Path(os.fsdecode(os.fsencode(src) + b"/" + raw))
        folder.mkdir(parents=True)
        volume = rng.integers(0, 1000, (8, 8, 8)).astype(np.int16) + i
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "scan.nii.gz")
        (folder / "empty.dcm").write_bytes(b"")  # quarantined: in the report and catalog
        (folder / "notes.txt").write_text("a note")
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, progress=False)
    assert result.counts == {
        "files": 6, "ingested": 2, "skipped": 2, "quarantined": 2, "scans": 2
    }  # fmt: skip
    report = json.loads(result.report_path.read_text(encoding="utf-8"))
    paths = sorted(f["path"] for f in report["files"])
    assert paths == sorted(f"{shown}/{f}" for shown in names.values() for f in
                           ("empty.dcm", "notes.txt", "scan.nii.gz"))  # fmt: skip
    quarantined = Catalog(ws.catalog_url).quarantined()
    listed = [f["path"] for f in report["files"]]  # report order
    expected = sorted(f"#{listed.index(f'{shown}/empty.dcm')}" for shown in names.values())
    assert sorted(q["path"] for q in quarantined) == expected  # positions in the report
    assert ingest(src, ws, progress=False).counts == result.counts  # and again: idempotent


def test_source_folders_named_after_patients_stay_out_of_the_catalog(tmp_path, monkeypatch):
    """Exports are often foldered by patient name. The report (in the workspace) is the one
    place for source paths; the catalog (shared when it is PostgreSQL) names quarantined files
    by their position in the report, also inside reasons, and keeps only a keyed hash of the
    source folder."""
    monkeypatch.setenv("MEDML_DEID_SECRET", "test")
    src = tmp_path / "DOE^JANE_export"
    paths = write_series(SeriesSpec(phantom(3, 16, 16)), src / "DOE^JANE" / "ct")
    copy = src / "DOE^JANE" / "ct-again" / "IM0001.dcm"  # a stray copy: "duplicate of <path>"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(paths[0].read_bytes())
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:-2]  # this file is quarantined
    ds.save_as(src / "DOE^JANE" / "broken.dcm")
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, progress=False)
    report = json.loads(result.report_path.read_text())
    assert any(f["status"] == "quarantined" for f in report["files"])
    assert "DOE^JANE" in json.dumps(report)  # the report keeps the paths
    catalog = Catalog(ws.catalog_url)
    stored = json.dumps([catalog.quarantined(), catalog.runs()], default=str)
    assert "DOE" not in stored and "JANE" not in stored
    assert catalog.quarantined() and all(q["path"].startswith("#") for q in catalog.quarantined())
    blob = (ws.root / "catalog.db").read_bytes()
    assert b"DOE" not in blob and b"JANE" not in blob


def test_reasons_lose_paths_and_names_but_keep_their_numbers():
    """The catalog's reasons: report paths and file names become positions, whole tokens only.
    Files named 1..12 or SR (exports do that) must not rewrite the numbers and words of a
    reason (they were, by a substring replace)."""
    from medml.ingest.report import FileRecord, quarantine_entries

    claim = ("too large: header claims 512 x 512 x 100 uint16 = 26214400 voxels (10.0 GiB), "
             "over ingest.max_voxels=1000000")  # fmt: skip
    files = [FileRecord(str(k), "ingested", scan_id="s") for k in range(1, 13)]
    files += [FileRecord("SR", "skipped", reason="non-image DICOM object (Modality SR)")]
    files += [
        FileRecord("2big", "quarantined", reason=claim),
        FileRecord("DOE^JANE/ct/IM0004.dcm", "ingested", scan_id="t"),
        FileRecord("DOE^JANE/ct/IM0005.dcm", "quarantined",
                   reason="duplicate slice position 12.50 mm (slices 3 and 4 of 20: "
                          "IM0004.dcm, IM0005.dcm)"),
        FileRecord("DOE^JANE/ct/x.dcm", "quarantined",
                   reason="conversion failed: OSError: cannot read 'DOE^JANE/ct/x.dcm': bad"),
        FileRecord("Jane Doe/scan one/IM1.dcm", "quarantined",
                   reason="unreadable DICOM: Jane Doe/scan one/IM1.dcm: truncated"),
    ]  # fmt: skip
    files.sort(key=lambda f: f.path)  # the report's order
    at = {f.path: i for i, f in enumerate(files)}
    entries = {e["path"]: e["reason"] for e in quarantine_entries(files)}
    assert entries[f"#{at['2big']}"] == claim
    four, five = at["DOE^JANE/ct/IM0004.dcm"], at["DOE^JANE/ct/IM0005.dcm"]
    dup = entries[f"#{five}"]
    assert dup == f"duplicate slice position 12.50 mm (slices 3 and 4 of 20: #{four}, #{five})"
    assert entries[f"#{at['DOE^JANE/ct/x.dcm']}"] == (
        f"conversion failed: OSError: cannot read '#{at['DOE^JANE/ct/x.dcm']}': bad"
    )
    spaced = entries[f"#{at['Jane Doe/scan one/IM1.dcm']}"]
    assert spaced == f"unreadable DICOM: #{at['Jane Doe/scan one/IM1.dcm']}: truncated"
    assert not any(word in " ".join(entries.values()) for word in ("DOE", "Jane", "IM000"))
