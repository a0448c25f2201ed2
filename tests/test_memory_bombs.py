"""Memory bombs: small files whose headers or streams claim gigabytes, ingested under a memory
limit. Each is quarantined with a reason naming the claim, before anything is allocated for it,
and the rest of the batch is ingested; prediction gives the bomb an error row and goes on.

Every bomb is written without allocating what it claims (zeros are streamed as repeated
compressed blocks), and each ingest runs in a child process under ``RLIMIT_AS``, so a
regression fails here with a MemoryError reason instead of taking the machine's memory. The
child's peak is its VmHWM: ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` would count the forked
parent's size (Linux keeps a process's pre-exec high-water mark).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from medml.config import IngestConfig
from medml.ingest import ingest
from medml.ingest.fixtures import (
    SeriesSpec,
    base_header,
    phantom,
    write_deflated,
    write_enhanced,
    write_series,
)
from medml.workspace import Workspace

ADDRESS_SPACE = 1536 * 2**20  # the child's whole address space: 1.5 GiB
PEAK_MB = 400  # what a refused bomb may cost, imports included
MB = 2**20
linux_only = pytest.mark.skipif(
    sys.platform != "linux",
    reason="the memory limit and peak need Linux (RLIMIT_AS, /proc/self/status VmHWM)",
)

CHILD = r"""
import json, resource, sys
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from pathlib import Path
from medml.config import IngestConfig
from medml.ingest import ingest
from medml.workspace import Workspace
result = ingest(Path(sys.argv[1]), Workspace(Path(sys.argv[2])), None, IngestConfig(workers=1),
                progress=False)
heavy = sorted(m for m in ("torch", "monai", "mlflow", "prefect") if m in sys.modules)
# this process's own peak: ru_maxrss would include the forked parent's size (Linux keeps the
# pre-exec high-water mark); VmHWM is the peak of this program alone (workers=1: no children)
status = open("/proc/self/status").read()
peak_kb = int(status.split("VmHWM:")[1].split()[0])
print(json.dumps({"report": str(result.report_path), "heavy": heavy, "peak_kb": peak_kb}))
"""


# ----------------------------------------------------------------------------- bomb writers


def _zero_blocks(n_mb: int) -> bytes:
    """Raw deflate of ``n_mb`` MiB of zeros, built from one compressed MiB repeated: after a
    sync flush each block only refers back to zeros, so copies of it inflate to more zeros."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    comp.compress(b"\0" * 65536)
    comp.flush(zlib.Z_SYNC_FLUSH)
    block = comp.compress(b"\0" * MB) + comp.flush(zlib.Z_SYNC_FLUSH)
    return block * n_mb


def _deflate(prefix: bytes, zeros_mb: int) -> bytes:
    """Raw deflate of ``prefix`` followed by ``zeros_mb`` MiB of zeros, finished."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(prefix + b"\0" * 65536) + comp.flush(zlib.Z_SYNC_FLUSH)
    return head + _zero_blocks(zeros_mb) + b"\x03\x00"  # an empty final block


def _nifti_header(shape: tuple[int, ...], dtype) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0\0\0\0"


def write_short_nifti(path: Path) -> None:
    """416 bytes whose header claims 1024^3 int16 (2 GiB)."""
    path.write_bytes(_nifti_header((1024, 1024, 1024), np.int16) + b"\0" * 64)


def write_gz_zeros(path: Path, shape: tuple[int, ...], dtype, zeros_mb: int) -> None:
    """A .nii.gz: the header member, then ``zeros_mb`` MiB of zeros as repeated gzip members
    (as ``gzip.open(path, "wb").write`` of zero chunks would give, without the compression)."""
    member = gzip.compress(b"\0" * MB, compresslevel=9, mtime=0)
    with path.open("wb") as fh:
        fh.write(gzip.compress(_nifti_header(shape, dtype), mtime=0))
        for _ in range(zeros_mb):
            fh.write(member)


def _image(spec: SeriesSpec, k: int, syntax: str):
    ds = base_header(spec)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"1.2.3.{k + 1}"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{v:.6f}" for v in spec.positions()[k]]
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    return ds


def write_rle_bombs(folder: Path) -> None:
    """Three ~1 KB RLE files each claiming 65535 x 65535 pixels (8 GiB decoded)."""
    folder.mkdir(parents=True)
    spec = SeriesSpec(np.zeros((3, 2, 2), np.uint16))
    # two segments (high and low bytes), each runs of 128 zeros: 0x81 = repeat next byte 128x
    segment = b"\x81\x00" * 200
    fragment = (2).to_bytes(4, "little") + (64).to_bytes(4, "little")
    fragment += (64 + len(segment)).to_bytes(4, "little") + b"\0" * 52 + segment * 2
    for k in range(3):
        ds = _image(spec, k, RLELossless)
        ds.Rows = ds.Columns = 65535
        ds.PixelData = encapsulate([fragment])
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    assert all(p.stat().st_size < 2048 for p in folder.iterdir())


def write_terabyte_dicom(folder: Path) -> None:
    """One enhanced multi-frame file claiming 65535^2 pixels x 2^31-1 frames (about 16 EiB)."""
    path = write_enhanced(SeriesSpec(np.zeros((1, 2, 2), np.uint16)), folder / "IM0001.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 2**31 - 1
    ds.save_as(path, enforce_file_format=True)


def write_deflated_bomb(path: Path, zeros_mb: int = 2048) -> None:
    """Deflated Explicit VR Little Endian: a 512 x 512 header, then pixel data of 2 GiB zeros
    (about 2 MB on disk), as pydicom would inflate it whole while reading the header."""
    path.parent.mkdir(parents=True)
    ds = _image(SeriesSpec(np.zeros((1, 512, 512), np.uint16)), 0, DeflatedExplicitVRLittleEndian)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_header = b"\xe0\x7f\x10\x00OW\0\0" + (zeros_mb * MB + 65536).to_bytes(4, "little")
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta)
    path.write_bytes(
        b"\0" * 128 + b"DICM" + meta.getvalue() + _deflate(body.getvalue() + pixel_header, zeros_mb)
    )


BOMBS = {
    "rle_65535_squared": (lambda src: write_rle_bombs(src / "rle"), "65535 x 65535"),
    "nifti_416_bytes_claiming_2gib": (
        lambda src: write_short_nifti(src / "short.nii"),
        "truncated: header claims 1024 x 1024 x 1024 int16 (2.0 GiB)",
    ),
    "nii_gz_2gib_zeros": (
        lambda src: write_gz_zeros(src / "zeros.nii.gz", (2048, 1024, 1024), np.uint8, 2048),
        "too large: header claims 2048 x 1024 x 1024 uint8",
    ),
    "nii_gz_more_zeros_than_claimed": (
        lambda src: write_gz_zeros(src / "more.nii.gz", (64, 64, 64), np.int16, 2048),
        "inflates past",
    ),
    "nifti_claiming_terabytes": (
        lambda src: write_gz_zeros(src / "tb.nii.gz", (32767, 32767, 32767), np.float64, 1),
        "TiB",
    ),
    "dicom_claiming_exabytes": (lambda src: write_terabyte_dicom(src / "tb"), "too large"),
    "deflated_dicom_2gib": (
        lambda src: write_deflated_bomb(src / "deflated" / "IM0001.dcm"),
        "inflates past",
    ),
}


def _healthy(src: Path) -> str:
    """A small NIfTI next to each bomb: the rest of the batch must still be ingested."""
    img = nib.Nifti1Image(np.arange(16**3, dtype=np.int16).reshape(16, 16, 16), np.eye(4))
    img.set_qform(np.eye(4), code=1)
    nib.save(img, src / "healthy.nii.gz")
    return "healthy.nii.gz"


def _ingest_limited(src: Path, ws: Path) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(ws), str(ADDRESS_SPACE)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["report"] = json.loads(Path(out["report"]).read_text())
    return out


@linux_only
@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_is_quarantined_with_its_claim_under_a_memory_limit(tmp_path, name):
    write, expected = BOMBS[name]
    src = tmp_path / "src"
    src.mkdir()
    write(src)
    healthy = _healthy(src)
    out = _ingest_limited(src, tmp_path / "ws")
    assert out["heavy"] == [], f"ingest imported {out['heavy']}"
    files = {f["path"]: f for f in out["report"]["files"]}
    assert files.pop(healthy)["status"] == "ingested"
    assert files, "the bomb is missing from the report"
    for path, record in files.items():
        assert record["status"] == "quarantined", (path, record)
        assert expected in record["reason"], (path, record["reason"])
        assert "MemoryError" not in record["reason"]
    assert out["peak_kb"] / 1024 < PEAK_MB, f"peak {out['peak_kb'] / 1024:.0f} MB"


def test_bombs_are_small_on_disk(tmp_path):
    """The bombs are what the attack used: kilobytes to a few megabytes."""
    for write, _ in BOMBS.values():
        write(tmp_path)
    sizes = [p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()]
    assert max(sizes) < 4 * MB


# ----------------------------------------------------------------------------- deflated DICOM


def test_deflated_series_of_realistic_size_equals_the_uncompressed_one(tmp_path):
    """64 x 64 x 8 deflated slices (compressible: the inflated dataset is larger than the
    file) and two 1024 x 1024 ones are ingested, voxel for voxel equal to the same series
    uncompressed; a deflated file cut short is still refused as truncated."""
    stored = phantom(8, 64, 64, seed=3)
    stored[:, :20] = 0  # air: compresses well, as real slices do
    src = tmp_path / "src"
    plain = SeriesSpec(stored.copy())
    deflated = SeriesSpec(stored.copy())
    write_series(plain, src / "plain")
    paths = write_deflated(deflated, src / "deflated")
    assert sum(p.stat().st_size for p in paths) < 0.75 * stored.size * 2  # it is compressed
    large = phantom(2, 1024, 1024, seed=4)  # 2 MiB a slice: inflated in more than one step
    write_series(SeriesSpec(large.copy()), src / "large_plain")
    write_deflated(SeriesSpec(large.copy()), src / "large_deflated")
    cut = SeriesSpec(stored.copy())
    cut_paths = write_deflated(cut, src / "cut")
    blob = cut_paths[3].read_bytes()
    cut_paths[3].write_bytes(blob[: len(blob) // 2])
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    report = {f["path"]: f for f in json.loads(result.report_path.read_text())["files"]}
    by_folder = {}
    for path, record in report.items():
        by_folder.setdefault(path.split("/")[0], []).append(record)
    assert {r["status"] for r in by_folder["deflated"]} == {"ingested"}, by_folder["deflated"]
    for folder in ("plain", "large_plain", "large_deflated"):
        assert {r["status"] for r in by_folder[folder]} == {"ingested"}, by_folder[folder]
    volumes = {
        folder: np.asarray(nib.load(ws.volumes / f"{records[0]['scan_id']}.nii.gz").dataobj)
        for folder, records in by_folder.items()
        if folder != "cut"
    }
    np.testing.assert_array_equal(volumes["deflated"], volumes["plain"])
    np.testing.assert_array_equal(volumes["large_deflated"], volumes["large_plain"])
    assert volumes["plain"].shape == (64, 64, 8)
    cut_record = report[f"cut/{cut_paths[3].name}"]
    assert cut_record["status"] == "quarantined" and "truncated" in cut_record["reason"]


# ----------------------------------------------------------------------------- prediction

PREDICT_CHILD = r"""
import json, resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from medml.config import IngestConfig, PreprocessConfig
from medml.predict.prefetch import Prefetcher
paths = json.loads(sys.argv[1])
cfg = PreprocessConfig(pixdim=(1.0, 1.0, 1.0), spatial_size=(16, 16, 16))
with Prefetcher(cfg, 0, ingest=IngestConfig()) as prefetch:
    vols, ids, errors = next(prefetch.map([paths]))
# this process's own peak: ru_maxrss would include the forked parent's size (Linux keeps the
# pre-exec high-water mark); VmHWM is the peak of this program alone (workers=1: no children)
status = open("/proc/self/status").read()
peak_kb = int(status.split("VmHWM:")[1].split()[0])
print(json.dumps({"ok": [v is not None for v in vols], "errors": errors, "peak_kb": peak_kb}))
"""


@linux_only
def test_predict_gives_a_bomb_an_error_row_and_goes_on(tmp_path):
    """The batch reader (``load_input`` through the prefetcher, as ``medml predict`` reads)
    refuses the bombs with their claim and reads the healthy input after them."""
    write_short_nifti(tmp_path / "short.nii")
    write_rle_bombs(tmp_path / "rle")
    write_deflated_bomb(tmp_path / "deflated" / "IM0001.dcm")
    healthy = tmp_path / _healthy(tmp_path)
    paths = [str(tmp_path / "short.nii"), str(tmp_path / "rle"), str(tmp_path / "deflated"),
             str(healthy)]  # fmt: skip
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    # torch reserves more address space than ingest: a larger limit, still far below the bombs
    limit = 3 * 2**30
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT_CHILD, json.dumps(paths), str(limit)],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] == [False, False, False, True]
    short, rle, deflated, ok = out["errors"]
    assert "truncated: header claims 1024 x 1024 x 1024 int16" in short
    assert "65535 x 65535" in rle and "too large" in rle
    assert "inflates past" in deflated
    assert ok is None
    assert "MemoryError" not in " ".join(e for e in out["errors"] if e)
    assert out["peak_kb"] / 1024 < 1500, f"peak {out['peak_kb'] / 1024:.0f} MB"


def test_max_voxels_is_a_setting(tmp_path):
    """``ingest.max_voxels`` decides: a 16^3 volume is refused under a ceiling of 1000 voxels."""
    src = tmp_path / "src"
    src.mkdir()
    name = _healthy(src)
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, IngestConfig(workers=1, max_voxels=1000), progress=False)
    (record,) = json.loads(result.report_path.read_text())["files"]
    assert record["path"] == name and record["status"] == "quarantined"
    assert "over ingest.max_voxels=1000" in record["reason"]


def test_a_series_is_budgeted_as_a_whole(tmp_path):
    """Planes that each fit the ceiling but together do not are refused before decoding."""
    src = tmp_path / "src"
    write_series(SeriesSpec(phantom(4, 16, 16)), src / "ct")  # 4 x 256 voxels
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, IngestConfig(workers=1, max_voxels=600), progress=False)
    records = json.loads(result.report_path.read_text())["files"]
    assert len(records) == 4
    for record in records:
        assert record["status"] == "quarantined"
        assert record["reason"].startswith("too large: header claims 4 planes of 16 x 16 pixels")


def test_native_pixel_data_shorter_than_claimed_is_refused(tmp_path):
    """Uncompressed multi-frame data claiming more bytes than its element holds (within the
    ceiling, so only the file can tell) is refused as truncated, not decoded."""
    path = write_enhanced(SeriesSpec(phantom(3, 16, 16)), tmp_path / "src" / "mf.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 4096
    ds.save_as(path, enforce_file_format=True)
    result = ingest(tmp_path / "src", Workspace(tmp_path / "ws"), None, IngestConfig(workers=1),
                    progress=False)  # fmt: skip
    (record,) = json.loads(result.report_path.read_text())["files"]
    assert record["status"] == "quarantined"
    assert "truncated: header claims 4096 x 4096 pixels x 3 frames" in record["reason"]
