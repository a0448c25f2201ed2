"""PACS overhead: pull + ingest + predict + SR send per series, over the folder path, on the
same studies.

Both paths start from a copy of one workspace holding a registered model (1 epoch on the tiny
synthetic set, ``NAME@champion``) and process the same N new synthetic CT studies (demo-sized:
``--matrix`` 96, 4-8 mm slices over 240 mm, one series each):

- folder: ``medml.ingest.ingest`` on the export folder, then ``predict_frame`` on its volumes
  (what ``medml ingest`` + ``medml predict`` do);
- PACS: the studies sit in a local Orthanc (loaded beforehand, not timed); the library steps of
  the ``pacs`` flow run: search + retrieve into the atomic inbox, ingest, predict, one SR per
  series built and sent back (STOW-RS for DICOMweb, C-STORE for DIMSE), watermark.

The ratio PACS / folder is printed per protocol (goal: <= 1.5). The paths run interleaved, once
to warm up (imports, model load, highdicom's tables of the standard: once per process), then
``--reps`` times, each on a fresh workspace copy; the medians are reported.

    .venv/bin/python bench/pacs.py                    # ~3 minutes on 2 CPU cores
    .venv/bin/python bench/pacs.py --studies 16 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "medml-bench-pacs"


def build_model_workspace(root: Path, config: Path):
    """Tiny synthetic set -> ingest -> 1-epoch encoder -> prototypes as NAME@champion."""
    from medml.config import load_settings
    from medml.fewshot.prototypes import select_support
    from medml.ingest import ingest
    from medml.registry.package import package_run
    from medml.registry.register import catalog_pairs, register_prototypes
    from medml.synth import generate
    from medml.tracking import configure
    from medml.train import train
    from medml.workspace import Workspace

    settings = load_settings(config, ["train.epochs=1", f"prototypes.model_name={NAME}"])
    ws = Workspace(root / "model-ws").ensure()
    generate(settings.synth, root / "train-raw", progress=False)
    ingest(root / "train-raw", ws, root / "train-raw" / "labels.csv", settings.ingest, False)
    configure(ws)
    fitted = train(settings, ws, progress=False)
    model_uri = package_run(fitted.run_id, settings, ws, fitted.checkpoint)
    pairs = catalog_pairs(ws, "train")
    picks = select_support([lab for _, lab in pairs], 2, np.random.default_rng(0))
    register_prototypes(model_uri, [pairs[i] for i in picks], NAME, workspace=ws)
    return settings, ws


def fresh(ws, root: Path, name: str):
    from medml.tracking import configure
    from medml.workspace import Workspace

    copy = Workspace(root / name)
    shutil.rmtree(copy.root, ignore_errors=True)
    shutil.copytree(ws.root, copy.root)
    configure(copy)
    return copy


def folder_path(settings, ws, export: Path) -> dict[str, float]:
    from medml.ingest import ingest
    from medml.predict.batch import predict_frame

    t0 = time.perf_counter()
    result = ingest(export, ws, None, settings.ingest, progress=False)
    t1 = time.perf_counter()
    frame = pd.DataFrame(
        [{"path": str(ws.volume_path(s)), "scan_id": s} for s in result.scan_ids], dtype=object
    )
    predict_frame(
        f"models:/{NAME}@champion",
        frame,
        ws.reports / "folder.csv",
        progress=False,
        ledger=False,
        workers=0,
    )
    t2 = time.perf_counter()
    return {"ingest": t1 - t0, "predict": t2 - t1, "total": t2 - t0, "scans": len(result.scan_ids)}


def pacs_path(settings, ws) -> dict[str, float]:
    from medml.pacs import pull as steps

    t0 = time.perf_counter()
    model = steps.resolve_model(f"models:/{NAME}@champion")
    pulled = steps.pull_new(settings.pacs, ws, model.key)
    t1 = time.perf_counter()
    ingested = steps.ingest_pulled(pulled, ws, settings.ingest)
    t2 = time.perf_counter()
    pred = steps.predict_pulled(
        pulled, ingested, model, ws, settings.predict, ws.reports / "pacs.csv"
    )
    t3 = time.perf_counter()
    sent = steps.send_reports(pulled, model, ws, settings.pacs)
    steps.advance_watermark(pulled, sent, model, ws, settings.pacs)
    t4 = time.perf_counter()
    assert sent["sent"] == len(pulled.series) == pred["series"], (sent, pred)
    return {
        "pull": t1 - t0,
        "ingest": t2 - t1,
        "predict": t3 - t2,
        "sr_send": t4 - t3,
        "total": t4 - t0,
        "series": len(pulled.series),
    }


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--matrix", type=int, default=96, help="in-plane size of the new studies")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from medml.config import SynthConfig
    from medml.pacs import orthanc as local
    from medml.synth import generate

    if local.missing():
        raise SystemExit(f"bench/pacs.py needs a local Orthanc: {local.missing()}")
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp:
        root = Path(tmp)
        settings, model_ws = build_model_workspace(root, args.config)
        export = root / "new-studies"
        new = SynthConfig(  # demo-sized CT (the defaults: 4-8 mm slices over 240 mm)
            kind=settings.synth.kind,
            n_patients=args.studies,
            seed=1234,
            format="dicom",
            matrix=args.matrix,
            followup_fraction=0.0,
        )
        generate(new, export, progress=False)
        (export / "labels.csv").unlink()
        files = sorted(export.rglob("*.dcm"))
        scp_port = local.free_port()
        with local.local_orthanc(root / "orthanc", {"MEDML": ("127.0.0.1", scp_port)}) as pacs:
            configs = {}
            for protocol in ("dicomweb", "dimse"):
                p = settings.pacs.model_copy(
                    update={
                        "protocol": protocol,
                        "dicomweb_url": pacs.dicomweb_url,
                        "port": pacs.dicom_port,
                        "called_aet": pacs.aet,
                        "modalities": ["CT"],
                        "listen_host": "127.0.0.1",
                        "listen_port": scp_port,
                    }
                )
                configs[protocol] = settings.model_copy(update={"pacs": p})
            # Paths interleaved per rep, so a busy machine slows them alike; rep 0 is a warm-up
            # (imports, model load, highdicom's tables of the standard: once per process).
            runs: dict[str, list[dict[str, float]]] = {"folder": [], "dicomweb": [], "dimse": []}
            for _ in range(args.reps + 1):
                runs["folder"].append(folder_path(settings, fresh(model_ws, root, "f"), export))
                for protocol, s in configs.items():
                    pacs.reset()
                    pacs.upload(files)
                    runs[protocol].append(pacs_path(s, fresh(model_ws, root, protocol)))
            results = {name: median(r[1:]) for name, r in runs.items()}
    folder = results["folder"]["total"]
    print(f"{args.studies} studies ({len(files)} DICOM files), median of {args.reps} runs")
    for name, r in results.items():
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in r.items() if k not in {"series", "scans"})
        print(f"  {name:9s} {parts}")
    ratios = {p: round(results[p]["total"] / folder, 3) for p in ("dicomweb", "dimse")}
    for p, ratio in ratios.items():
        verdict = "meets" if ratio <= 1.5 else "misses"
        print(f"  PACS ({p}) / folder: {ratio:.2f}x  ({verdict} the <= 1.5x goal)")
    print(json.dumps({"studies": args.studies, "results": results, "ratio": ratios}))


if __name__ == "__main__":
    main()
