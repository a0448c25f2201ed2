"""Benchmark: medml ingest vs dcm2niix on the same DICOM tree (not a test).

Generates (once, under /tmp) a tree of N series of S slices of 512x512 CT, then times
``medml.ingest.ingest`` into a fresh workspace and ``dcm2niix`` over the same tree, both
writing gzip NIfTI at their fastest level (medml: ISA-L level 1; dcm2niix: ``-z i -1``, its
built-in deflate at level 1; no BIDS sidecars). Prints wall times, the ratio medml/dcm2niix
(goal <= 1.5), slices per second, and output sizes.

    .venv/bin/python bench/ingest.py [--series 20] [--slices 100] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medml.config import IngestConfig
from medml.ingest import ingest
from medml.ingest.fixtures import SeriesSpec, write_series
from medml.workspace import Workspace


def ct_like(n: int, size: int, seed: int) -> np.ndarray:
    """Stored values shaped like a CT: air, a body ellipse with soft tissue, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    body = ((x - size / 2) / (size * 0.4)) ** 2 + ((y - size / 2) / (size * 0.3)) ** 2 < 1
    base = np.where(body, 1064, 24).astype(np.int32)
    out = np.empty((n, size, size), np.uint16)
    for k in range(n):
        out[k] = np.clip(base + rng.normal(0, 15, (size, size)).astype(np.int32), 0, 4095)
    return out


def make_tree(root: Path, n_series: int, n_slices: int, size: int) -> Path:
    marker = root / f".complete-{n_series}x{n_slices}x{size}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n_series):
        spec = SeriesSpec(ct_like(n_slices, size, seed=i), slice_step=1.25)
        write_series(spec, root / f"patient{i:02d}" / "study" / "ct")
    marker.write_text("ok")
    return root


def warm(root: Path) -> None:
    for p in root.rglob("*.dcm"):
        p.read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=20)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=0, help="0: one per CPU")
    ap.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "medml-bench-dicom")
    args = ap.parse_args()

    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    t = time.perf_counter()
    src = make_tree(args.tree, args.series, args.slices, args.size)
    print(f"tree: {src} ({args.series} series x {args.slices} slices of {args.size}^2, "
          f"ready in {time.perf_counter() - t:.1f} s)")  # fmt: skip
    n_slices = args.series * args.slices
    warm(src)

    with tempfile.TemporaryDirectory(prefix="medml-bench-") as tmp:
        tmp = Path(tmp)
        ws = Workspace(tmp / "ws")
        t = time.perf_counter()
        result = ingest(src, ws, None, IngestConfig(workers=args.workers), progress=False)
        t_medml = time.perf_counter() - t
        assert result.counts["scans"] == args.series, result.counts

        out = tmp / "d2n"
        out.mkdir()
        t = time.perf_counter()
        subprocess.run([dcm2niix, "-z", "i", "-1", "-b", "n", "-f", "%j", "-o", str(out), str(src)],
                       check=True, capture_output=True)  # fmt: skip
        t_ref = time.perf_counter() - t
        n_out = len(list(out.glob("*.nii.gz")))
        size_medml = sum(p.stat().st_size for p in ws.volumes.glob("*.nii.gz")) / 2**20
        size_ref = sum(p.stat().st_size for p in out.glob("*.nii.gz")) / 2**20

    print(f"cpus: {os.cpu_count()}  medml workers: {args.workers or 'auto'}")
    print(f"medml    {t_medml:7.2f} s  {n_slices / t_medml:7.0f} slices/s  {size_medml:7.1f} MiB")
    print(f"dcm2niix {t_ref:7.2f} s  {n_slices / t_ref:7.0f} slices/s  {size_ref:7.1f} MiB "
          f"({n_out} volumes)")  # fmt: skip
    print(f"ratio medml/dcm2niix: {t_medml / t_ref:.2f} (goal <= 1.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
