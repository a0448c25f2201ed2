"""One set of series checks (SeriesChecks, from settings.ingest) for ingestion and prediction,
and the stack invariant that turns a grouping bug into a quarantine instead of a volume."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import SeriesChecks, dicom, ingest
from medml.ingest.fixtures import SeriesSpec, phantom, write_classic_4d, write_series
from medml.predict.loading import load_input
from medml.workspace import Workspace

# 0.02 mm shear per 2.5 mm slice: 0.46 deg, over the 0.05 deg default
TILTED = dict(tilt_mm_per_slice=0.02, slice_step=2.5)


def _ingest(src, tmp_path, cfg: IngestConfig) -> tuple[list[dict], dict]:
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, cfg, progress=False)
    return list(Catalog(ws.catalog_url).scans_by_id().values()), json.loads(
        result.report_path.read_text()
    )


def test_checks_from_config_carry_every_threshold_and_policy():
    cfg = IngestConfig(max_tilt_deg=1.0, min_slices=3, gap_factor=2.0, on_missing_slice="convert",
                       on_4d="quarantine", allow_burned_in=True)  # fmt: skip
    checks = SeriesChecks.from_config(cfg)
    assert (checks.max_tilt_deg, checks.min_slices, checks.gap_factor) == (1.0, 3, 2.0)
    assert checks.on_4d == "quarantine"
    assert checks.action("missing_slice") == "convert"
    assert checks.action("burned_in") == "convert"
    assert checks.action("unresolved_4d") == "quarantine"
    assert SeriesChecks.from_config(IngestConfig()).max_tilt_deg == SeriesChecks().max_tilt_deg


def test_prediction_accepts_and_refuses_what_ingestion_does(tmp_path):
    """A slightly tilted series with a permissive max_tilt_deg: ingested, and predicted on with
    the same settings (prediction used the defaults, and max_tilt_deg never reached the check)."""
    spec = SeriesSpec(phantom(5, 16, 12, seed=2), **TILTED)
    write_series(spec, tmp_path / "src" / "tilted")
    folder = tmp_path / "src" / "tilted"
    cfg = IngestConfig(workers=1, max_tilt_deg=1.0)
    rows, _ = _ingest(tmp_path / "src", tmp_path, cfg)
    assert len(rows) == 1
    tensor, _ = load_input(folder, cfg)
    ingested = nib.load(tmp_path / "ws" / rows[0]["volume"])
    # prediction keeps the stored axes (the chain reads them as RAS): the same voxels at the
    # same places once reoriented as ingestion stores them
    read = nib.as_closest_canonical(nib.Nifti1Image(tensor[0].numpy(), tensor.affine.numpy()))
    np.testing.assert_array_equal(np.asarray(read.dataobj), np.asarray(ingested.dataobj))
    np.testing.assert_allclose(read.affine, ingested.affine, atol=1e-4)
    # with the defaults both refuse, for the same reason
    _, report = _ingest(tmp_path / "src", tmp_path / "strict", IngestConfig(workers=1))
    assert report["files"][0]["reason"].startswith("gantry tilt")
    with pytest.raises(ValueError, match="gantry tilt"):
        load_input(folder, SeriesChecks())
    # and batch prediction's preparation step passes the model's ingest settings on
    from medml.config import PreprocessConfig
    from medml.predict.prefetch import Prefetcher

    pp = PreprocessConfig(pixdim=(8.0, 8.0, 8.0), spatial_size=(8, 8, 8))
    for ingest_cfg, ok in ((cfg, True), (IngestConfig(), False)):
        with Prefetcher(pp, 0, ingest=ingest_cfg) as prefetch:
            vols, _, errors = next(prefetch.map([[str(folder)]]))
        assert (vols[0] is not None) == ok and (errors[0] is None) == ok, errors


def test_prediction_follows_the_missing_slice_policy(tmp_path):
    write_series(SeriesSpec(phantom(6, 12, 10, seed=4)), tmp_path / "gap")
    (tmp_path / "gap" / "IM0003.dcm").unlink()
    with pytest.raises(ValueError, match="missing slice"):
        load_input(tmp_path / "gap")
    tensor, _ = load_input(tmp_path / "gap", IngestConfig(on_missing_slice="convert"))
    assert tensor.shape[1:] == (10, 12, 5)


def test_a_grouping_bug_becomes_a_quarantine_not_a_volume(tmp_path):
    """Swap one slice between two correctly split volumes: the invariant catches it."""
    spec = SeriesSpec(phantom(4, 12, 10, seed=1), modality="MR")
    write_classic_4d(spec, tmp_path / "s", [{"EchoNumbers": 1}, {"EchoNumbers": 2}])
    slices = [dicom.Slice(p, dicom.read_header(p)) for p in sorted((tmp_path / "s").iterdir())]
    one, two = dicom.group_series(slices)
    checks = SeriesChecks()
    assert checks.judge(one).action == checks.judge(two).action == "convert"
    one.slices[0], two.slices[0] = two.slices[0], one.slices[0]
    verdict = checks.judge(one)
    assert verdict.action == "quarantine"
    assert verdict.reason.startswith("internal check: planes of one volume differ in EchoNumbers")
    # uneven spacing that the gap check lets through (1.2 x median) is no stack either
    three = dicom.group_series(slices[:4])[0]
    three.slices[1].geometry = {"ImagePositionPatient": [-100.0, -80.0, 43.0]}
    verdict = checks.judge(three)
    assert verdict == verdict.__class__(
        "quarantine", "internal check: slice positions are not evenly spaced"
    )


def test_colour_images_are_quarantined_whatever_on_derived_says(tmp_path):
    rgb = np.repeat(phantom(3, 8, 6, seed=5)[..., None], 3, axis=-1)  # (slice, row, col, RGB)
    colour = {"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0}
    spec = SeriesSpec(rgb.reshape(3, 8, 18), modality="MR", extra={**colour, "Columns": 6})
    write_series(spec, tmp_path / "src" / "rgb")
    rows, report = _ingest(
        tmp_path / "src", tmp_path, IngestConfig(workers=1, on_derived="convert")
    )
    assert rows == []
    assert {f["status"] for f in report["files"]} == {"quarantined"}
    assert all(f["reason"].startswith("unsupported DICOM: colour image (RGB, 3 samples")
               for f in report["files"])  # fmt: skip
