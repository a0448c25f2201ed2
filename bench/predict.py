"""Batch inference overhead: end-to-end scans/s over model-only forward scans/s, and flat memory.

A fresh tiny model (configs/tiny.yaml, 1 epoch) on tiny synthetic CT. "End to end" is
``medml.predict.batch.predict_frame`` (read NIfTI, canonical orientation, MONAI preprocessing,
embed, classify, append CSV + Parquet, ledger) on N copies of the ingested volumes; "model
only" is the encoder forward on the same volumes already preprocessed in memory, same batch
size. Peak RSS is measured in a fresh process per run size (100 vs 1000 scans).

    .venv/bin/python bench/predict.py                # ~ a few minutes on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]


def _inputs(ws_root: Path, volumes: list[Path], n: int) -> Path:
    folder = ws_root / f"incoming-{n}"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        shutil.copy(volumes[i % len(volumes)], folder / f"scan_{i:05d}.nii.gz")
    return folder


def child(uri: str, folder: Path, out: Path, batch_size: int, tracking: str) -> None:
    """One predict_frame run; prints scans/s, the model-only rate and peak RSS as JSON."""
    import mlflow

    from medml.predict.batch import discover_inputs, predict_frame
    from medml.predict.pyfunc import load_medml_model

    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    paths = discover_inputs([folder])
    s = predict_frame(
        uri,
        pd.DataFrame({"path": paths}),
        out,
        batch_size,
        progress=False,
        formats=["csv", "parquet"],
        ledger=True,
    )
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "n": s.n_inputs,
        "errors": s.n_errors,
        "seconds": s.seconds,
        "e2e_scans_per_s": s.scans_per_s,
        "peak_rss_mb": rss_mb,
    }
    if len(paths) <= 200:
        # Model-only (volumes preprocessed in memory) and end to end with the model loaded (a
        # long-running service's steady state), interleaved 3 times on this busy machine so
        # both see the same load; medians reported.
        model = load_medml_model(uri)
        vols, _, _ = model.preprocess_paths(paths)
        model.embed_volumes(vols[:batch_size])  # warm-up
        only, e2e = [], []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(0, len(vols), batch_size):
                model.embed_volumes(vols[i : i + batch_size])
            only.append(len(vols) / (time.perf_counter() - start))
            start = time.perf_counter()
            for i in range(0, len(paths), batch_size):
                v, ids, errs = model.preprocess_paths(paths[i : i + batch_size])
                model.rows(model.embed_volumes(v), ids, errs)
            e2e.append(len(paths) / (time.perf_counter() - start))
        result["model_only_scans_per_s"] = sorted(only)[1]
        result["e2e_loaded_scans_per_s"] = sorted(e2e)[1]
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[100, 1000])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", nargs=4, metavar=("URI", "FOLDER", "OUT", "TRACKING"))
    args = parser.parse_args()
    if args.child:
        uri, folder, out, tracking = args.child
        child(uri, Path(folder), Path(out), args.batch_size, tracking)
        return

    from medml.catalog import Catalog
    from medml.config import load_settings
    from medml.ingest import ingest
    from medml.synth import generate
    from medml.tracking import configure
    from medml.train import train
    from medml.workspace import Workspace

    torch.set_num_threads(1)
    settings = load_settings(ROOT / "configs" / "tiny.yaml", ["train.epochs=1"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        generate(settings.synth, tmp_path / "raw", progress=False)
        ws = Workspace(tmp_path / "ws").ensure()
        ingest(
            tmp_path / "raw", ws, tmp_path / "raw" / "labels.csv", settings.ingest, progress=False
        )
        configure(ws)
        trained = train(settings, ws, progress=False)
        volumes = [ws.root / s["volume"] for s in Catalog(ws.catalog_url).list_scans()]
        runs = {}
        for n in args.sizes:
            folder = _inputs(ws.root, volumes, n)
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--batch-size",
                    str(args.batch_size),
                    "--child",
                    trained.model_uri,
                    str(folder),
                    str(tmp_path / f"pred-{n}.csv"),
                    ws.mlflow_uri,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        small, large = (runs[n] for n in args.sizes)
        print(
            f"volumes: {settings.preprocess.spatial_size} network input, batch "
            f"{args.batch_size}, CPU threads 1"
        )
        for n, r in runs.items():
            print(
                f"{n:5d} scans: {r['e2e_scans_per_s']:.1f} scans/s end to end "
                f"(incl. model load), {r['errors']} errors, peak RSS {r['peak_rss_mb']:.0f} MB"
            )
        print(
            f"model-only forward: {small['model_only_scans_per_s']:.1f} scans/s; end to end "
            f"with the model loaded: {small['e2e_loaded_scans_per_s']:.1f} scans/s"
        )
        print(
            f"ratio end-to-end / model-only ({args.sizes[1]} scans, incl. model load): "
            f"{large['e2e_scans_per_s'] / small['model_only_scans_per_s']:.2f} (goal >= 0.8)"
        )
        print(
            f"ratio end-to-end (model loaded) / model-only: "
            f"{small['e2e_loaded_scans_per_s'] / small['model_only_scans_per_s']:.2f}"
        )
        print(
            f"peak RSS {args.sizes[1]} / {args.sizes[0]} scans: "
            f"{large['peak_rss_mb'] / small['peak_rss_mb']:.3f} (goal <= 1.10)"
        )


if __name__ == "__main__":
    main()
