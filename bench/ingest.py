"""Benchmark: medml ingest vs dcm2niix (``-z y``) on many small series and on large series.

Two trees, one run, one ratio each (medml / dcm2niix wall time; goal <= 1.0 on both):

- small: dcm2niix's validation sets under ../shared/data/dicom (mosaics, classic and enhanced
  4D, 12-bit; about 700 files in 22 folders), each tool run once over the whole tree as a
  user would, start-up included: ``medml ingest SRC`` (the command line, in a fresh process)
  and ``dcm2niix -z y -b n -d 9 -o OUT SRC``.
- large: a generated tree of N series of S slices of 512x512 CT (once, under /tmp), medml's
  library call against ``dcm2niix -z y -b n``.

Both write gzip NIfTI (medml: ISA-L level 1; dcm2niix ``-z y``: pigz if installed, else its
own deflate, level 6) without BIDS sidecars. Each figure is the best of ``--repeat`` runs (the
machine is shared). Also prints the start-up of every command (``medml CMD --help`` in a fresh
process: what it imports), the fixed cost of ``medml ingest`` (an empty folder) and the load
average before and after.

    .venv/bin/python bench/ingest.py [--series 20] [--slices 100] [--workers 0] [--repeat 3]
                                     [--small-only]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dicom"


def _cpu() -> float:
    """CPU seconds of this process and its finished children (worker pools, subprocesses)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(repeat: int, run: Callable[[Path], None]) -> tuple[float, float]:
    """Best wall time and best CPU time of ``repeat`` runs, each into a fresh folder.

    CPU time is the steadier figure on a shared machine, where wall time includes waiting.
    """
    walls, cpus = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="medml-bench-") as tmp:
            t, c = time.perf_counter(), _cpu()
            run(Path(tmp))
            walls.append(time.perf_counter() - t)
            cpus.append(_cpu() - c)
    return min(walls), min(cpus)


def medml_cli(src: Path, ws: Path, workers: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "medml.cli", "ingest", str(src), "--workspace", str(ws)]
    if workers:
        cmd += ["--set", f"ingest.workers={workers}"]
    subprocess.run(cmd, check=True, capture_output=True, env=env)


def dcm2niix_run(dcm2niix: str, src: Path, out: Path, *extra: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([dcm2niix, "-z", "y", "-b", "n", *extra, "-o", str(out), str(src)],
                   check=True, capture_output=True)  # fmt: skip


def start_up(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of ``medml ARGS`` in a fresh process (interpreter start included)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t, c = time.perf_counter(), _cpu()
    subprocess.run([sys.executable, "-m", "medml.cli", *args], check=True, capture_output=True,
                   env=env)  # fmt: skip
    return time.perf_counter() - t, _cpu() - c


def commands() -> list[list[str]]:
    """Every command of ``medml --help`` (sub-commands of groups too), as argument lists."""
    import typer

    from medml.cli import app

    out = []
    for name, cmd in sorted(typer.main.get_command(app).commands.items()):
        subs = getattr(cmd, "commands", None)
        out += [[name, sub] for sub in sorted(subs)] if subs else [[name]]
    return out


def start_up_table(repeat: int) -> None:
    """Start-up of ``medml CMD --help`` for every command: what each command imports."""
    print("start-up, best of", repeat, "(wall / CPU s): medml --help", end="")
    for args in [[], *commands()]:
        runs = [start_up([*args, "--help"]) for _ in range(repeat)]
        wall, cpu = min(w for w, _ in runs), min(c for _, c in runs)
        print(f"{',' if args else ''} {' '.join(args) or ''} {wall:.2f} / {cpu:.2f}", end="")
    print()


def small_series(dcm2niix: str, repeat: int, workers: int) -> float | None:
    if not SHARED.is_dir():
        print(f"small series: skipped ({SHARED} is absent)")
        return None
    files = [p for p in SHARED.rglob("*") if p.is_file()]
    warm_files(files)
    t_medml, c_medml = best_of(repeat, lambda tmp: medml_cli(SHARED, tmp / "ws", workers))
    t_ref, c_ref = best_of(
        repeat, lambda tmp: dcm2niix_run(dcm2niix, SHARED, tmp / "d2n", "-d", "9")
    )
    print(f"small series ({len(files)} files under {SHARED.resolve()}):")
    print(f"  medml ingest (CLI) {t_medml:6.2f} s wall {c_medml:6.2f} s CPU")
    print(f"  dcm2niix -z y      {t_ref:6.2f} s wall {c_ref:6.2f} s CPU")
    print(f"  ratio medml/dcm2niix: wall {t_medml / t_ref:.2f}, CPU {c_medml / c_ref:.2f} "
          "(goal <= 1.0)")  # fmt: skip
    return t_medml / t_ref


def warm_files(files: list[Path]) -> None:
    for p in files:
        p.read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=20)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=0, help="0: one per idle CPU when it pays")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--small-only", action="store_true", help="skip the large series")
    ap.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "medml-bench-dicom")
    args = ap.parse_args()

    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    print(f"cpus: {os.cpu_count()}  medml workers: {args.workers or 'auto'}  "
          f"best of {args.repeat}")  # fmt: skip
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    start_up_table(args.repeat)
    with tempfile.TemporaryDirectory() as tmp:  # ingest of an empty folder: fixed costs
        empty = Path(tmp) / "empty"
        empty.mkdir()
        runs = [start_up(["ingest", str(empty), "--workspace", f"{tmp}/ws{i}"])
                for i in range(args.repeat)]  # fmt: skip
        print(f"medml ingest EMPTY_FOLDER: {min(w for w, _ in runs):.2f} s wall "
              f"{min(c for _, c in runs):.2f} s CPU")  # fmt: skip
    small = small_series(dcm2niix, args.repeat, args.workers)
    if args.small_only:
        print(f"load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        return 0

    t = time.perf_counter()
    src = make_tree(args.tree, args.series, args.slices, args.size)
    print(f"large series: {src} ({args.series} series x {args.slices} slices of "
          f"{args.size}^2, ready in {time.perf_counter() - t:.1f} s)")  # fmt: skip
    n_slices = args.series * args.slices
    warm(src)
    cfg = IngestConfig(workers=args.workers)

    def medml_lib(tmp: Path) -> None:
        result = ingest(src, Workspace(tmp / "ws"), None, cfg, progress=False)
        assert result.counts["scans"] == args.series, result.counts

    t_medml, c_medml = best_of(args.repeat, medml_lib)
    t_ref, c_ref = best_of(args.repeat, lambda tmp: dcm2niix_run(dcm2niix, src, tmp / "d2n"))
    print(f"  medml         {t_medml:7.2f} s wall {c_medml:7.2f} s CPU  "
          f"{n_slices / t_medml:6.0f} slices/s")  # fmt: skip
    print(
        f"  dcm2niix -z y {t_ref:7.2f} s wall {c_ref:7.2f} s CPU  {n_slices / t_ref:6.0f} slices/s"
    )
    print(f"  ratio medml/dcm2niix: wall {t_medml / t_ref:.2f}, CPU {c_medml / c_ref:.2f} "
          "(goal <= 1.0)")  # fmt: skip
    if small is not None:
        print(f"ratios medml/dcm2niix -z y: small series {small:.2f}, large series "
              f"{t_medml / t_ref:.2f}")  # fmt: skip
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
