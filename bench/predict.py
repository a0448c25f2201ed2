"""Batch inference overhead: end-to-end scans/s over model-only forward scans/s, and flat memory.

The demo's model (configs/demo.yaml: ResNet-10, 32^3 input; 1 training epoch, enough for
throughput) on demo-sized synthetic CT (96^2 matrix). "End to end" is
``medml.predict.batch.predict_frame``: read NIfTI, MONAI preprocessing and the forward pass
(in ``predict.workers`` processes, each embedding its own batches), classify, append CSV +
Parquet, ledger; on N copies of the ingested volumes. "Model only" is the encoder forward on
the same volumes already preprocessed in memory, same batch size, one torch thread. Peak RSS
is measured in a fresh process per run size (100 vs 1000 scans).

    .venv/bin/python bench/predict.py                 # ~2 minutes on 2 idle CPU cores
    .venv/bin/python bench/predict.py --config configs/tiny.yaml   # the tiny test model

It also prints, on a real-size CT DICOM series (512^2 x 160 slices written by ``medml.synth``),
the cost of one prediction (read with ingestion's readers, the MONAI chain, the forward pass;
model loaded) next to ``dcm2niix -z n`` converting the same series.

The ratio is bounded by cores: preparing one scan costs several forward passes of this model,
so end to end keeps up with the model only with about (prepare ms / forward ms) workers; the
bench prints both costs and that bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _inputs(ws_root: Path, volumes: list[Path], n: int) -> Path:
    folder = ws_root / f"incoming-{n}"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        shutil.copy(volumes[i % len(volumes)], folder / f"scan_{i:05d}.nii.gz")
    return folder


def _median_rate(n: int, run, reps: int = 3) -> tuple[float, float]:
    """Median scans/s over ``reps`` runs, and this process's median CPU ms per scan (robust on
    a shared machine, where wall rates fall with the load)."""
    rates, cpu_ms = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        rates.append(n / (time.perf_counter() - start))
        cpu_ms.append((time.process_time() - start_cpu) * 1000 / n)
    return sorted(rates)[len(rates) // 2], sorted(cpu_ms)[len(cpu_ms) // 2]


def child(uri: str, folder: Path, out: Path, batch_size: int, tracking: str, workers: int) -> None:
    """One predict_frame run; prints scans/s, the model-only rate and peak RSS as JSON."""
    import mlflow

    from medml.predict.batch import inputs_frame, predict_frame
    from medml.predict.prefetch import Prefetcher
    from medml.predict.pyfunc import load_medml_model

    torch.set_num_threads(1)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    frame = inputs_frame([folder])
    paths = list(frame.path)
    s = predict_frame(
        uri,
        frame,
        out,
        batch_size,
        progress=False,
        formats=["csv", "parquet"],
        ledger=True,
        workers=workers,
    )
    # this process plus its preparing workers (each as large as the largest one; they have
    # ended and been reaped, so RUSAGE_CHILDREN holds the largest)
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + workers * child_mb
    result = {
        "n": s.n_inputs,
        "errors": s.n_errors,
        "seconds": s.seconds,
        "e2e_scans_per_s": s.scans_per_s,
        "peak_rss_mb": rss_mb,
    }
    if len(paths) <= 200:
        # Steady state (model loaded, worker pool started, as in a long-running service) next
        # to model-only (volumes preprocessed in memory) and one-scan-at-a-time preparation.
        model = load_medml_model(uri)
        vols, _, _ = model.preprocess_paths(paths)
        batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        model.embed_volumes(vols[:batch_size])  # warm-up

        def model_only() -> None:
            for i in range(0, len(vols), batch_size):
                model.embed_volumes(vols[i : i + batch_size])

        def prepare_only() -> None:
            model.preprocess_paths(paths)

        # as predict_frame runs it: the workers prepare and embed, this process decides
        with Prefetcher(
            model.settings.preprocess, workers, encoder=model.encoder, dim=model.dim
        ) as prefetch:
            list(prefetch.embed_map(batches[:2]))  # workers started and warm

            def end_to_end() -> None:
                for paths_b, (emb, ids, errs) in zip(batches, prefetch.embed_map(batches)):
                    model.rows(paths_b, emb, ids, errs)

            n = len(paths)
            result["model_only_scans_per_s"], result["model_cpu_ms"] = _median_rate(n, model_only)
            result["prepare_one_core_scans_per_s"], result["prepare_cpu_ms"] = _median_rate(
                n, prepare_only
            )
            result["e2e_loaded_scans_per_s"], _ = _median_rate(n, end_to_end)
    print(json.dumps(result))


def real_size_series(config: Path, tmp: Path, model_uri: str, reps: int = 3) -> dict:
    """One prediction (read + MONAI chain + forward, model loaded) on a real-size CT DICOM
    series against dcm2niix converting the same series to uncompressed NIfTI (``-z n``)."""
    from medml.config import load_settings
    from medml.predict.pyfunc import load_medml_model
    from medml.synth import generate

    big = load_settings(
        config,
        [
            "synth.n_patients=1",
            "synth.format=dicom",
            "synth.matrix=512",
            "synth.slice_thickness_mm=[1.5, 1.5]",
            "synth.followup_fraction=0",
        ],
    )
    generate(big.synth, tmp / "big", progress=False)
    series = max(
        (p.parent for p in (tmp / "big").rglob("*.dcm")), key=lambda d: len(list(d.iterdir()))
    )
    n_slices = len(list(series.glob("*.dcm")))
    model = load_medml_model(model_uri)
    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    out = tmp / "dcm2niix-out"
    out.mkdir()

    def ours() -> None:
        _, _, errors = model.embed_paths([str(series)])
        assert errors == [None], errors

    def theirs() -> None:
        for f in out.iterdir():
            f.unlink()
        subprocess.run([dcm2niix, "-z", "n", "-b", "n", "-o", str(out), str(series)],
                       check=True, capture_output=True)  # fmt: skip

    times = {}
    for name, run in (("medml", ours), ("dcm2niix", theirs)):
        run()  # warm caches (file system, imports)
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
        times[name] = sorted(samples)[len(samples) // 2]
    return {"slices": n_slices, "matrix": 512, **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--sizes", type=int, nargs=2, default=[100, 1000])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="preparing processes"
    )
    parser.add_argument(
        "--skip-real-size", action="store_true", help="skip the 512^2 DICOM vs dcm2niix part"
    )
    parser.add_argument("--child", nargs=4, metavar=("URI", "FOLDER", "OUT", "TRACKING"))
    args = parser.parse_args()
    if args.child:
        uri, folder, out, tracking = args.child
        child(uri, Path(folder), Path(out), args.batch_size, tracking, args.workers)
        return

    from medml.catalog import Catalog
    from medml.config import load_settings
    from medml.ingest import ingest
    from medml.registry.package import package_run
    from medml.synth import generate
    from medml.tracking import configure
    from medml.train import train
    from medml.workspace import Workspace

    torch.set_num_threads(1)
    settings = load_settings(args.config, ["train.epochs=1", "synth.n_patients=20"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        generate(settings.synth, tmp_path / "raw", progress=False)
        ws = Workspace(tmp_path / "ws").ensure()
        ingest(
            tmp_path / "raw", ws, tmp_path / "raw" / "labels.csv", settings.ingest, progress=False
        )
        configure(ws)
        trained = train(settings, ws, progress=False)
        model_uri = package_run(trained.run_id, settings, ws, trained.checkpoint)
        volumes = [ws.root / s["volume"] for s in Catalog(ws.catalog_url).list_scans()]
        runs = {}
        for n in args.sizes:
            folder = _inputs(ws.root, volumes, n)
            cmd = [sys.executable, __file__, "--batch-size", str(args.batch_size)]
            cmd += ["--workers", str(args.workers), "--child", model_uri, str(folder)]
            cmd += [str(tmp_path / f"pred-{n}.csv"), ws.mlflow_uri]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        small, large = (runs[n] for n in args.sizes)
        model_only = small["model_only_scans_per_s"]
        one_core = small["prepare_one_core_scans_per_s"]
        print(
            f"{args.config.name}: {settings.preprocess.spatial_size} network input, "
            f"{settings.model.backbone}, batch {args.batch_size}, torch threads 1, "
            f"{args.workers} preparing processes on {os.cpu_count()} CPUs"
        )
        for n, r in runs.items():
            print(
                f"{n:5d} scans: {r['e2e_scans_per_s']:.1f} scans/s end to end "
                f"(incl. model load and pool start), {r['errors']} errors, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB"
            )
        print(
            f"model-only forward {model_only:.1f} scans/s ({1000 / model_only:.1f} ms/scan); "
            f"preparing on one core {one_core:.1f} scans/s ({1000 / one_core:.1f} ms/scan); "
            f"end to end, model loaded and workers warm: {small['e2e_loaded_scans_per_s']:.1f}"
        )
        print(
            f"ratio end-to-end (model loaded) / model-only: "
            f"{small['e2e_loaded_scans_per_s'] / model_only:.2f} (goal >= 0.8; "
            f"about {model_only / one_core:.1f} preparing cores would reach 1.0)"
        )
        fwd, prep = small["model_cpu_ms"], small["prepare_cpu_ms"]
        print(
            f"CPU per scan: forward {fwd:.2f} ms, preparing {prep:.2f} ms; on {os.cpu_count()} "
            f"idle cores end to end can reach at most "
            f"{min(1.0, (os.cpu_count() or 1) * fwd / (fwd + prep)):.2f} of model-only "
            f"(every core busy, forward and preparing together; load average "
            f"{os.getloadavg()[0]:.1f} now)"
        )
        print(
            f"ratio end-to-end ({args.sizes[1]} scans, incl. model load) / model-only: "
            f"{large['e2e_scans_per_s'] / model_only:.2f}"
        )
        print(
            f"peak RSS {args.sizes[1]} / {args.sizes[0]} scans: "
            f"{large['peak_rss_mb'] / small['peak_rss_mb']:.3f} (goal <= 1.10)"
        )
        if not args.skip_real_size:
            big = real_size_series(args.config, tmp_path, model_uri)
            print(
                f"real-size CT series ({big['matrix']}^2 x {big['slices']} slices, DICOM): "
                f"one prediction {big['medml']:.2f} s (read + chain + forward, model loaded) vs "
                f"dcm2niix -z n {big['dcm2niix']:.2f} s; "
                f"ratio {big['medml'] / big['dcm2niix']:.2f} (goal <= 2)"
            )


if __name__ == "__main__":
    main()
