"""``--messy`` exports: every file has an expected ingest outcome, and ingestion is held to it."""

import json
from collections import Counter

import pydicom
import pytest

from medml.config import IngestConfig, SynthConfig
from medml.ingest import ingest
from medml.synth import EXPECTED_INGEST, generate
from medml.synth.messy import EXPECTED
from medml.workspace import Workspace

SMALL = {"matrix": 24, "z_extent_mm": 96.0, "slice_thickness_mm": (8.0, 12.0)}

# Cases whose default outcome needs the ingestion rewrite that follows the agreed policy
# (being written alongside); strict=False lets them pass as soon as it does.


@pytest.fixture(scope="module")
def messy_ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    cfg = SynthConfig(kind="covid-ct", n_patients=3, seed=4, format="mixed", messy=True, **SMALL)
    out = generate(cfg, root / "raw", progress=False).out
    expected = json.loads((out / EXPECTED_INGEST).read_text())["files"]
    result = ingest(out, Workspace(root / "ws"), out / "labels.csv", IngestConfig(), progress=False)
    report = json.loads(result.report_path.read_text())
    return out, expected, {f["path"]: f for f in report["files"]}


@pytest.mark.parametrize("kind", ["covid-ct", "cirrhosis-mri"])
def test_expectations_name_every_file_and_every_case(tmp_path, kind):
    cfg = SynthConfig(kind=kind, n_patients=2, seed=1, format="dicom", messy=True, **SMALL)
    out = generate(cfg, tmp_path, progress=False).out
    expected = json.loads((out / EXPECTED_INGEST).read_text())["files"]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(expected)
    assert set(Counter(e["case"] for e in expected.values())) == set(EXPECTED)
    for rel, e in expected.items():
        assert (e["status"], e["reason"]) == EXPECTED[e["case"]], rel
    by_case = {e["case"]: rel for rel, e in expected.items()}
    loc = pydicom.dcmread(out / by_case["localizer"])
    assert "LOCALIZER" in loc.ImageType
    sr = pydicom.dcmread(out / by_case["dose-report"])
    assert sr.Modality == "SR" and "PixelData" not in sr
    sc = pydicom.dcmread(out / by_case["secondary-capture"])
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.pixel_array.ndim == 2
    copy = out / by_case["duplicate-series"]
    original = copy.parent.parent / copy.parent.name.removesuffix("_copy") / copy.name
    assert copy.read_bytes() == original.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - pydicom raises several types here
        pydicom.dcmread(out / by_case["truncated"]).pixel_array  # noqa: B018
    missing = out / by_case["missing-slice"]
    n_missing = len(list(missing.parent.glob("*.dcm")))
    n_clean = len(list((missing.parent.parent / "series-1").glob("*.dcm")))
    assert n_missing == n_clean - 1


def test_report_accounts_for_every_file(messy_ct):
    _, expected, got = messy_ct
    assert set(got) == set(expected)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_ingest_outcome_matches_expectation(messy_ct, case):
    _, expected, got = messy_ct
    paths = [p for p, e in expected.items() if e["case"] == case]
    assert paths
    for path in paths:
        status, prefix = EXPECTED[case]
        record = got[path]
        assert record["status"] == status, (path, record)
        if prefix:
            assert (record.get("reason") or "").startswith(prefix), (path, record)
