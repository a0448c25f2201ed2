"""The ``medml`` command line (typer). Each command wraps one library call or flow.

Exit codes: 0 success (quarantined inputs included), 2 unusable arguments, 1 failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperOption

from medml.workspace import Workspace

# Quiet, offline defaults (set before MLflow/Prefect/MONAI are imported by any command).
# Prefect's in-process server can need more than its default 20 s to start on 2 cores.
for _key, _value in (
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    ("DO_NOT_TRACK", "true"),
    ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
):
    os.environ.setdefault(_key, _value)

_type_shown = TyperOption.display_type_rich


def _no_type_for_flags(self: TyperOption, ctx: Any) -> str | None:
    # typer 0.29 shows flags (--rerun, --help) as `--rerun <bool>`, which reads as if they took
    # a value; a flag takes none, so show no type.
    return "" if self.is_flag else _type_shown(self, ctx)


TyperOption.display_type_rich = _no_type_for_flags  # type: ignore[method-assign]

app = typer.Typer(
    help="medml: raw CT/MRI exports -> de-identified catalog -> metric-learning encoder -> "
    "few-shot predictions, tracked in MLflow and orchestrated by Prefect.\n\n"
    "Start with `medml pipeline --config configs/demo.yaml` (what `make demo` runs).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="Workspace folder (default: $MEDML_WORKSPACE, else ./workspace)."
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", exists=True, dir_okay=False, help="YAML config (see configs/)."),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set train.epochs=3")
]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait", help="If another command is writing to the workspace, wait for it to finish."
    ),
]


def _settings(config: Path | None, overrides: list[str] | None):
    from medml.config import load_settings

    try:
        return load_settings(config, overrides)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--config/--set") from exc


def _workspace(explicit: Path | None, settings=None) -> Workspace:
    if explicit is None and not os.environ.get("MEDML_WORKSPACE") and settings is not None:
        explicit = settings.workspace
    return Workspace.resolve(explicit)


def _tracked_workspace(explicit: Path | None) -> Workspace:
    """The workspace, with MLflow pointed at its tracking store and registry."""
    from medml.tracking import configure

    ws = _workspace(explicit)
    configure(ws)
    return ws


def _read_workspace(explicit: Path | None) -> Workspace:
    """The workspace of a command that only reads (predict, evaluate, promote), with MLflow
    pointed at it; refused (exit 2) when it does not exist, so that no read creates one."""
    from medml.tracking import configure

    ws = _workspace(explicit)
    uri = ws.mlflow_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise typer.BadParameter(
            f"no workspace at {ws.root} (no {Path(uri.removeprefix('sqlite:///')).name} there): "
            "pass --workspace (or set MEDML_WORKSPACE) to the folder `medml pipeline` or "
            "`medml train` wrote, or set MLFLOW_TRACKING_URI to your tracking server",
            param_hint="--workspace",
        )
    configure(ws)
    return ws


def _require_catalog(ws: Workspace) -> None:
    """Refuse to train on an empty catalog before any MLflow run is started."""
    from medml.catalog import Catalog

    url = ws.catalog_url
    missing = url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists()
    if missing or not Catalog(url).list_scans():
        typer.secho(
            f"error: the catalog is empty ({url}): run `medml ingest SRC` (or `medml pipeline`) "
            "first, or pass --workspace to the workspace that holds your scans",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)


def _json_line(payload: dict[str, Any]) -> None:
    """Print the contract JSON line (NaN becomes null)."""
    from medml.io import jsonable

    typer.echo(json.dumps(jsonable(payload)))


def _writing(ws: Workspace, command: str, wait: bool) -> contextlib.AbstractContextManager:
    """The workspace's writer lock (one writer per workspace, docs/operations.md). A busy
    workspace raises ``WorkspaceBusy`` naming the writer (exit 1 by ``_fail``) unless ``--wait``."""
    from medml.lock import workspace_lock

    return workspace_lock(ws.root, command, wait=wait, catalog_url=ws.catalog_url)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "mlflow", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MONAI probes for NVIDIA's image codec on import; on CPU machines that is expected.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


@app.command()
def synth(
    kind: Annotated[str, typer.Argument(help="Dataset kind: covid-ct or cirrhosis-mri.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write DICOM/NIfTI and labels.csv.")
    ],
    n_patients: Annotated[
        int | None, typer.Option(help="Number of patients [synth.n_patients: 60].")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed; same seed, same bytes [synth.seed: 0].")
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="dicom, nifti or mixed [synth.format: mixed].")
    ] = None,
    novel: Annotated[
        bool, typer.Option("--novel", help="Add finding classes for few-shot (class_set novel).")
    ] = False,
    messy: Annotated[
        bool,
        typer.Option(
            "--messy",
            help="Add localizers, an SR, duplicates, broken series, secondary captures, a README; "
            "OUT/expected_ingest.json gives each file's expected ingest outcome.",
        ),
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a synthetic dataset (phantoms with fake patient identities) and OUT/labels.csv."""
    from medml.synth import generate

    # Options given on the command line win over --config/--set; options left out do not
    # override them (their defaults are the config's).
    given = {"kind": kind, "n_patients": n_patients, "seed": seed, "format": format}
    flags = {"novel": novel or None, "messy": messy or None}
    settings = _settings(
        config,
        [
            *(set_ or []),
            *(f"synth.{k}={v}" for k, v in {**given, **flags}.items() if v is not None),
        ],
    )
    try:
        result = generate(settings.synth, out)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(
        f"wrote {result.n_studies} studies of {result.n_patients} patients to {out}; "
        f"labels: {result.labels_csv}"
    )


@app.command("import-medmnist")
def import_medmnist_cmd(
    npz: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="MedMNIST 3D .npz (28^3 or 64^3).")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(help="Which of the six 3D sets (default: from the file name)."),
    ] = None,
    workspace: WorkspaceOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Import a MedMNIST 3D set into the catalog, keeping its official splits and class names."""
    from medml.importers.medmnist import MedMNISTError, import_medmnist

    ws = _workspace(workspace)
    try:
        with _writing(ws, "import-medmnist", wait):
            result = import_medmnist(npz, ws, dataset)
    except MedMNISTError as exc:
        raise typer.BadParameter(str(exc), param_hint="NPZ") from exc
    except Exception as exc:
        _fail(exc)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    typer.echo(
        f"imported {result.dataset} ({result.size}^3, classes {', '.join(result.classes)}): "
        f"{counts}; {result.written} volumes written to {ws.volumes}; catalog {ws.catalog_url}"
    )


@app.command("ingest")
def ingest_cmd(
    src: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="Folder tree of DICOM/NIfTI.")
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="CSV with label + series_uid/path/study_uid/patient_id.",
        ),
    ] = None,
    folder_labels: Annotated[
        bool, typer.Option("--folder-labels", help="SRC/<label>/...: one folder per class.")
    ] = False,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Ingest a folder into de-identified RAS NIfTI + catalog; write the ingest report.

    Policies per case (skip / quarantine / convert) are `ingest.on_*` settings, e.g.
    `--set ingest.on_derived=convert`; see docs/ingestion.md.
    """
    from medml.ingest import ingest
    from medml.ingest.labels import LabelError

    settings = _settings(config, set_)
    ws = _workspace(workspace, settings if config else None)
    cfg = settings.ingest.model_copy(update={"folder_labels": True}) if folder_labels else None
    try:
        with _writing(ws, "ingest", wait):
            result = ingest(src, ws, labels, cfg or settings.ingest)
    except LabelError as exc:
        raise typer.BadParameter(str(exc), param_hint="--labels") from exc
    except Exception as exc:
        _fail(exc)
    c = result.counts
    typer.echo(
        f"{c['files']} files: {c['ingested']} ingested into {c['scans']} scans, "
        f"{c['skipped']} skipped, {c['quarantined']} quarantined. Report: {result.report_path}"
    )


@app.command("plan")
def plan_cmd(
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    memory_gb: Annotated[
        float | None,
        typer.Option(min=0.01, help="Memory a training batch may use [plan.memory_gb; detected]."),
    ] = None,
    wait: WaitOpt = False,
) -> None:
    """Fingerprint the catalog and write WS/plans.json: target spacing, input size, CT window or
    MR normalisation, batch size. Steps that resolve the plans take from them every setting
    their config leaves unset (see docs/planning.md)."""
    from medml.lock import WorkspaceBusy
    from medml.planning import PlanningError, plan_workspace

    settings = _settings(config, set_)
    ws = _workspace(workspace, settings if config else None)
    if not ws.root.is_dir():  # never create a workspace as a side effect
        raise typer.BadParameter(
            f"workspace {ws.root} does not exist: run `medml ingest` (or `medml pipeline`) first",
            param_hint="--workspace",
        )
    try:
        # the lock is taken inside, after the checks: a missing workspace is never created
        plans, path = plan_workspace(ws, settings.plan, memory_gb, wait=wait)
    except (PlanningError, WorkspaceBusy) as exc:
        _fail(exc)
    fp = plans.fingerprint
    intensity = (
        f"window [{plans.window[0]:g}, {plans.window[1]:g}] HU"
        if plans.window
        else {"MR": "z-score (nonzero voxels)", "mask": "0..1 scaling, no crop"}.get(
            plans.modality, plans.modality
        )
    )
    counts = "; ".join(
        f"{split}: " + ", ".join(f"{k} {v}" for k, v in c.items())
        for split, c in plans.class_counts.items()
    )
    lines = [
        f"{fp.n_scans} scans ({', '.join(f'{m} {n}' for m, n in fp.modalities.items())}), "
        f"{fp.sampled} volumes sampled for intensities",
        f"  median spacing {_mm(fp.spacing.median)}, median shape {_vox(fp.shape.median)}",
        f"  modality     {plans.modality}: {intensity}",
        f"  pixdim       {_mm(plans.pixdim)}{' (anisotropic)' if plans.anisotropic else ''}",
        f"  spatial size {_vox(plans.spatial_size)}",
        f"  batch size   {plans.batch_size} for {plans.memory_gb:g} GiB ({plans.memory_source})",
        f"  classes      {counts or 'no labelled scans'}",
        *[f"  note: {n}" for n in plans.notes],
        f"plans: {path}",
    ]
    typer.echo("\n".join(lines))


def _mm(values) -> str:
    return " x ".join(f"{v:g}" for v in values) + " mm"


def _vox(values) -> str:
    return "x".join(f"{v:g}" for v in values)


@app.command("train")
def train_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the latest unfinished run (or --run-id).")
    ] = False,
    run_id: Annotated[
        str | None, typer.Option(help="With --resume: the MLflow run id to continue.")
    ] = None,
    wait: WaitOpt = False,
) -> None:
    """Train an encoder on the catalog's train split; prints the run id and test metrics as JSON.

    Under `torchrun --nproc-per-node N -m medml.cli train ...` it trains with
    DistributedDataParallel (gloo on CPU, NCCL on GPU).
    """
    from medml.evaluate.run import evaluate_run
    from medml.registry.package import package_run
    from medml.train import checkpoint, train

    settings = _settings(config, set_)
    ws = _workspace(workspace, settings)
    _require_catalog(ws)
    last = None
    if resume:
        last = (
            ws.checkpoints / run_id / "last.pt"
            if run_id
            else checkpoint.find_resumable(ws.checkpoints)
        )
        if last is None or not last.exists():
            raise typer.BadParameter(
                f"no checkpoint to resume in {ws.checkpoints}", param_hint="--resume"
            )
    try:
        with _writing(ws, "train", wait):
            fitted = train(settings, ws, resume=last)
            if not fitted.run_id:  # another rank of a torchrun job: rank 0 reports
                return
            metrics = evaluate_run(fitted.run_id, settings, ws, fitted.checkpoint)
            model_uri = package_run(fitted.run_id, settings, ws, fitted.checkpoint)
    except Exception as exc:
        _fail(exc)
    typer.echo(f"model: {model_uri}", err=True)
    _json_line(metrics)


@app.command("pretrain")
def pretrain_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Self-supervised pretraining (SimCLR / NT-Xent) of the encoder on every catalog scan
    outside the test split, labels unused. Then train from it with
    `--set model.init_from=runs:/RUN_ID` (printed at the end)."""
    from medml.train.pretrain import pretrain

    settings = _settings(config, set_)
    ws = _workspace(workspace, settings)
    try:
        with _writing(ws, "pretrain", wait):
            result = pretrain(settings, ws)
    except Exception as exc:
        _fail(exc)
    typer.echo(
        f"pretrained encoder: runs:/{result.run_id} (set model.init_from to use it)", err=True
    )
    _json_line({"run_id": result.run_id, "init_from": f"runs:/{result.run_id}",
                "losses": result.losses})  # fmt: skip


@app.command("sweep")
def sweep_cmd(
    losses: Annotated[
        str, typer.Option(help="Comma-separated losses, e.g. triplet,arcface,adacos,softmax.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    folds: Annotated[
        int | None,
        typer.Option(min=2, help="Cross-validation folds on train+val (default: sweep.folds)."),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="Optuna trials per loss (default: sweep.trials).")
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            min=1, help="Final fits per loss, each evaluated on test (default: sweep.seeds)."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Fits at once; > 1: a local Dask cluster (default: sweep.workers)."
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Compare losses by the Reality Check protocol: K-fold CV, the same Optuna budget per loss,
    seeded refits evaluated once on test, a winner only beyond the noise. Re-running the same
    command resumes a killed sweep."""
    from medml.losses.registry import LOSSES

    names = [n.strip() for n in losses.split(",") if n.strip()]
    unknown = sorted(set(names) - set(LOSSES.names()))
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown loss(es) {unknown}; choose from {', '.join(LOSSES)}", param_hint="--losses"
        )
    settings = _settings(config, set_)
    ws = _workspace(workspace, settings)
    _require_catalog(ws)
    from flows.sweep import sweep_flow

    try:
        with _writing(ws, "sweep", wait):
            result = sweep_flow(
                names, settings, str(ws.root), folds=folds, trials=trials, seeds=seeds,
                workers=workers,
            )  # fmt: skip
    except Exception as exc:
        _fail(exc)
    typer.echo(Path(result["table_md"]).read_text(), err=True)
    typer.echo(f"parent run {result['parent_run_id']}; figure: {result['figure']}", err=True)
    _json_line({k: result[k] for k in ("parent_run_id", "winner", "significant", "verdict")})


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="MLflow model URI (runs:/ID/model, models:/NAME@alias)."
        ),
    ],
    ways: Annotated[int | None, typer.Option(help="N classes per episode.")] = None,
    shots: Annotated[int | None, typer.Option(help="K support scans per class.")] = None,
    episodes: Annotated[int | None, typer.Option(help="Number of episodes.")] = None,
    split: Annotated[
        str | None, typer.Option(help="Catalog split to evaluate [the model's evaluate.split].")
    ] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Retrieval metrics, nearest-centroid accuracy and few-shot episodes; JSON line last."""
    import mlflow

    from medml.evaluate.run import evaluate_encoder, flat_metrics
    from medml.predict.pyfunc import load_medml_model
    from medml.tracking import use_experiment

    ws = _read_workspace(workspace)
    try:
        m = load_medml_model(model)
        updates = {k: v for k, v in (("ways", ways), ("shots", shots), ("episodes", episodes)) if v}
        cfg = m.settings.evaluate.model_copy(update=updates)
        split = split or cfg.split
        use_experiment(ws, m.settings.train.experiment)
        with mlflow.start_run(run_name="evaluate") as run:
            mlflow.log_params({"model_uri": model, "split": split, **updates})
            protos = m.prototypes  # the model decides by its own rule and temperature
            result = evaluate_encoder(
                m.encoder, ws, m.settings.preprocess, cfg, split,
                rule=protos.rule.name if protos.rule else "centroid",
                rule_options=m.settings.prototypes.rule_options, temperature=protos.temperature,
            )  # fmt: skip
            mlflow.log_metrics(flat_metrics(result, f"{split}_"))
    except Exception as exc:
        _fail(exc)
    _json_line({"run_id": run.info.run_id, **result})


def _validation_pairs(ws: Workspace, validation: Path | None) -> list[tuple[str, str]]:
    """Validation scans from ``--validation`` (CSV or class folders), else the catalog's val
    split; empty when the workspace has no catalog to draw from."""
    from medml.registry.register import catalog_pairs, read_support

    if validation is not None:
        return read_support(validation)
    url = ws.catalog_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return []  # no catalog here: nothing to calibrate or compare on
    return catalog_pairs(ws, "val")


@app.command("prototypes")
def prototypes_cmd(
    model: Annotated[
        str, typer.Option("--model", "-m", help="MLflow model URI whose encoder to use.")
    ],
    support: Annotated[
        Path,
        typer.Option(
            exists=True, help="CSV (path,label) or a folder with one subfolder per class."
        ),
    ],
    register: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str, typer.Option(help="Alias to point at the new version.")] = "champion",
    validation: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="Validation scans (CSV or class folders) to fit temperature and 'unknown' "
            "threshold [default: the workspace catalog's val split, when it has one].",
        ),
    ] = None,
    far: Annotated[
        float | None,
        typer.Option(help="Target false-accept rate of the 'unknown' threshold [config]."),
    ] = None,
    workspace: WorkspaceOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Build class prototypes from a support set and register a new model version."""
    from medml.registry.register import read_support, register_prototypes

    ws = _tracked_workspace(workspace)
    try:
        with _writing(ws, "prototypes", wait):
            val = _validation_pairs(ws, validation)
            reg = register_prototypes(
                model,
                read_support(support),
                register,
                alias,
                validation=val or None,
                target_far=far,
                workspace=ws,
            )
    except Exception as exc:
        _fail(exc)
    typer.echo(
        f"registered {reg.name} version {reg.version} (@{reg.alias}) with classes "
        f"{', '.join(reg.classes)}: models:/{reg.name}@{reg.alias}"
        + ("" if val else " (not calibrated: no validation scans)")
    )


@app.command("predict")
def predict_cmd(
    inputs: Annotated[
        list[Path], typer.Argument(help="NIfTI files, DICOM series folders, or folders of them.")
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="MLflow model URI, e.g. models:/NAME@champion.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output path; written as .csv and/or .parquet [predict.formats]."
        ),
    ],
    batch_size: Annotated[int | None, typer.Option(help="Scans per forward pass.")] = None,
    explain: Annotated[
        Path | None,
        typer.Option(
            help="Folder for an explanation PNG per predicted scan (also for predictions "
            "reused from an earlier run)."
        ),
    ] = None,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Predict again scans this model already predicted.")
    ] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Batch inference on new scans: one row per input, in input order, with the input's path
    first; error rows for bad inputs. Schema: docs/inference.md."""
    from medml.predict.batch import inputs_frame, predict_frame
    from medml.predict.loader import ModelNotFoundError

    pc = _settings(config, overrides).predict
    _read_workspace(workspace)
    try:
        summary = predict_frame(
            model,
            inputs_frame([str(p) for p in inputs]),
            out,
            batch_size or pc.batch_size,
            formats=pc.formats,
            ledger=not rerun,
            explain=explain,
            workers=pc.workers,
        )
    except ModelNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from exc
    except Exception as exc:
        _fail(exc)
    explained = f"; {summary.n_explained} explanations in {explain}" if explain else ""
    typer.echo(
        f"{summary.n_inputs} inputs ({summary.n_skipped} already predicted by this model), "
        f"{summary.n_errors} errors, {summary.seconds:.1f}s, {summary.scans_per_s:.2f} scans/s; "
        f"classes {summary.counts}; wrote {', '.join(map(str, summary.files))}{explained}"
    )


@app.command("promote")
def promote_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    validation: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="Validation scans (CSV or class folders) [default: the catalog's val split].",
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Compare @challenger with @champion on validation scans; move @champion if better."""
    from medml.registry.promote import promote

    ws = _read_workspace(workspace)
    try:
        with _writing(ws, "promote", wait):
            val = _validation_pairs(ws, validation)
            if not val:
                raise ValueError("no validation scans: pass --validation")
            result = promote(name, val)
    except Exception as exc:
        _fail(exc)
    typer.echo(("promoted: " if result.promoted else "kept champion: ") + result.reason)


@app.command("pipeline")
def pipeline_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Run the whole chain as one Prefect flow (synthetic data -> predictions)."""
    settings = _settings(config, set_)
    ws = _workspace(workspace, settings)
    from flows.pipeline import pipeline

    try:
        with _writing(ws, "pipeline", wait):
            result = pipeline(settings, str(ws.root))
    except Exception as exc:
        _fail(exc)
    _print_summary(result, ws)


@app.command("serve")
def serve_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
    start_server: Annotated[
        bool,
        typer.Option(
            "--start-server", help="Start `prefect server start` on 127.0.0.1 if none is set."
        ),
    ] = False,
) -> None:
    """Serve the Prefect deployments until Ctrl-C: nightly batch inference over a watch folder,
    scheduled ingest, and train/sweep/prototypes/pipeline on demand (see docs/operations.md)."""
    settings = _settings(config, set_)
    from flows.serve import NO_SERVER_HELP, api_url, local_server, serve_deployments

    url, o = api_url(), settings.orchestration
    if url is None and not start_server:  # before touching the workspace: nothing to clean up
        typer.echo(NO_SERVER_HELP, err=True)
        raise typer.Exit(1)
    ws = _workspace(workspace, settings).ensure()
    try:
        if url is None:
            with local_server(o.server_port, ws, o.server_start_timeout_s) as local:
                typer.echo(f"Prefect server at {local} (UI {local.removesuffix('/api')})", err=True)
                serve_deployments(settings, ws, local)
        else:
            serve_deployments(settings, ws, url)
    except Exception as exc:
        _fail(exc)


# ----------------------------------------------------------------------------- PACS

pacs_app = typer.Typer(
    help="New studies from a PACS (DICOMweb or DIMSE, the `pacs:` config section); "
    "results back as DICOM SR. Credentials: $MEDML_PACS_USERNAME/$MEDML_PACS_PASSWORD or "
    "$MEDML_PACS_TOKEN.",
    no_args_is_help=True,
)
app.add_typer(pacs_app, name="pacs")


@pacs_app.command("pull")
def pacs_pull_cmd(
    since: Annotated[
        str | None,
        typer.Option(help="Studies from this date (YYYYMMDD) [default: the watermark]."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model URI [pacs.model_uri, else NAME@champion]."),
    ] = None,
    ingest_only: Annotated[
        bool, typer.Option("--ingest-only", help="Pull and ingest; no prediction, no SR.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Pull new series from the PACS, ingest them, predict, send one SR per series (the
    `pacs` flow once); `--ingest-only` stops after ingestion and leaves the watermark."""
    if since is not None and not (len(since) == 8 and since.isdigit()):
        raise typer.BadParameter("expected a date as YYYYMMDD", param_hint="--since")
    settings = _settings(config, set_)
    ws = _workspace(workspace, settings).ensure()
    try:
        if ingest_only:
            from medml.pacs.pull import pull_and_ingest

            result = pull_and_ingest(settings, ws, since)
        else:
            from flows.pacs import pacs_flow

            result = pacs_flow(
                since=since, model_uri=model, settings=settings, workspace=str(ws.root)
            )
    except Exception as exc:
        _fail(exc)
    _json_line(result)


def _listen(
    port: int | None, quiet: float | None, studies: int | None, config, set_, workspace
) -> None:
    import signal
    import threading

    from medml.pacs.pull import inbox_dir, ingest_received, keymaker
    from medml.pacs.receiver import StoreReceiver

    settings = _settings(config, set_)
    ws = _workspace(workspace, settings).ensure()
    p = settings.pacs
    receiver = StoreReceiver(
        inbox_dir(p, ws, "listen"),
        keymaker(ws),
        ingest_received(settings, ws),
        ae_title=p.calling_aet,
        host=p.listen_host,
        port=p.listen_port if port is None else port,
        quiet_s=quiet or p.quiet_s,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        receiver.start()
    except OSError as exc:
        _fail(exc)
    typer.echo(f"listening as {p.calling_aet} on {receiver.host}:{receiver.port}", err=True)
    try:
        while not stop.wait(0.2):
            if studies is not None and receiver.totals["studies"] >= studies:
                break
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
    _json_line(receiver.totals)


@app.command("listen")
def listen_cmd(
    port: Annotated[int | None, typer.Option(help="Port [pacs.listen_port].")] = None,
    quiet: Annotated[
        float | None, typer.Option(help="Seconds without instances before a study is handed on.")
    ] = None,
    studies: Annotated[
        int | None, typer.Option(help="Stop after this many studies [default: until Ctrl-C].")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """A C-STORE receiver (DICOM SCP, AE title pacs.calling_aet): studies pushed by a PACS or a
    scanner are ingested once quiet; prints the instance counts as a JSON line when stopped."""
    _listen(port, quiet, studies, config, set_, workspace)


def _num(value: Any) -> str:
    """A metric for the summary: 3 decimals, or "n/a" where it is undefined (None or NaN: a
    test split too small for retrieval, no predictions with labels)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.3f}"
    return "n/a"


def _print_summary(result: dict[str, Any], ws: Workspace) -> None:
    m = result["train"]["metrics"]
    fs = m.get("fewshot") or {}
    p = result["predict"]
    lines = [
        "",
        "medml pipeline finished",
        f"  workspace      {ws.root}",
        f"  ingest report  {result['ingest']['report']}  ({result['ingest']['scans']} scans)",
        f"  catalog        {ws.catalog_url}",
        f"  cache          {ws.cache}",
        f"  train run      {m['run_id']}",
        f"  test metrics   P@1 {_num(m.get('precision_at_1'))}  "
        f"R-precision {_num(m.get('r_precision'))}  "
        f"MAP@R {_num(m.get('mean_average_precision_at_r'))}",
        f"                 nearest-centroid accuracy {_num(m.get('accuracy'))}"
        f"  balanced {_num(m.get('balanced_accuracy'))}  AUROC {_num(m.get('auroc'))}"
        + (f"  kappa {_num(m['kappa_quadratic'])}" if "kappa_quadratic" in m else ""),
        f"                 {fs.get('ways')}-way {fs.get('shots')}-shot accuracy "
        f"{_num(fs.get('accuracy'))} ± {_num(fs.get('ci95'))} "
        f"over {fs.get('episodes')} episodes",
        f"  model          {result['champion_uri']} (version {result['champion']['version']})",
        f"  predictions    {p['predictions']}  ({p['n']} scans, {p['errors']} errors, "
        f"accuracy vs labels {_num(p.get('accuracy_vs_labels'))})",
        "",
        f"  MLflow UI:  mlflow ui --backend-store-uri {ws.mlflow_uri}",
        "  Prefect UI: prefect server start   (then open http://127.0.0.1:4200)",
    ]
    typer.echo("\n".join(lines))
    _json_line(m)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
