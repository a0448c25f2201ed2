"""Settings: one pydantic model per pipeline step, loaded from ``configs/*.yaml``.

Every tunable lives here with its default; code never hides constants of its own.
``--set key.sub=value`` overrides are applied to the raw YAML before validation.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from medml.extensions import registry


def _registered(module: str, attr: str):
    """A validator: the value must be a name of that extension registry (imported by name)."""
    return AfterValidator(lambda name: registry(module, attr).check(name))


Modality = Annotated[str, _registered("medml.data.intensity", "INTENSITY")]
Backbone = Annotated[str, _registered("medml.models.backbones", "BACKBONES")]
LossName = Annotated[str, _registered("medml.losses.registry", "LOSSES")]
RuleName = Annotated[str, _registered("medml.fewshot.registry", "RULES")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthConfig(_Strict):
    """Synthetic dataset written by ``medml synth``."""

    kind: Literal["covid-ct", "cirrhosis-mri"] = "covid-ct"
    n_patients: int = Field(60, ge=1)
    seed: int = 0
    format: Literal["dicom", "nifti", "mixed"] = "mixed"
    matrix: int = Field(96, ge=16, description="in-plane matrix size (voxels)")
    fov_mm: float = Field(360.0, gt=0, description="in-plane field of view")
    z_extent_mm: float = Field(240.0, gt=0, description="through-plane coverage")
    slice_thickness_mm: tuple[float, float] = (4.0, 8.0)
    followup_fraction: float = Field(0.2, ge=0, le=1, description="patients with a 2nd study")
    difficulty: float = Field(
        1.0, ge=0, description="scales nuisances and class overlap; 0 makes classes clean"
    )
    # 0.4 / 0.7: the demo's model (configs/demo.yaml) then scores ~75 % 5-way 5-shot, in the
    # 70-90 % band that keeps adjacent stages confusable (docs/datasets.md has the runs).
    overlap: float = Field(
        0.4, ge=0, description="how far severity strays into adjacent stages (x difficulty)"
    )
    nuisance: float = Field(
        0.7, ge=0, description="pose, size, noise, blur, bias field, scanner scale (x difficulty)"
    )
    novel: bool = Field(False, description="add finding classes never used in training")
    messy: bool = Field(False, description="surround the scans with a realistic messy export")
    planes: tuple[float, float, float] = Field(
        (0.5, 0.25, 0.25), description="MRI: weights of axial, coronal and oblique acquisitions"
    )
    oblique_deg: tuple[float, float] = Field((10.0, 30.0), description="MRI: oblique tilt range")
    weightings: tuple[Literal["T1", "T2"], ...] = Field(
        ("T1", "T2"), min_length=1, description="MRI contrasts drawn per patient"
    )


SkipOrQuarantine = Literal["skip", "quarantine"]
Policy = Literal["skip", "quarantine", "convert"]


class IngestConfig(_Strict):
    """How ``medml ingest`` treats its input (see docs/ingestion.md for each case).

    ``convert`` converts anyway and adds a warning to the report.
    """

    allow_burned_in: bool = Field(False, description="shorthand for on_burned_in=convert")
    min_slices: int = Field(2, ge=1)
    gap_factor: float = Field(1.5, gt=1, description="a gap over this x the median is a hole")
    max_tilt_deg: float = Field(0.05, ge=0, description="slice shear above this is gantry tilt")
    on_localizer: Policy = "skip"
    on_non_image: SkipOrQuarantine = "skip"
    on_derived: Policy = "skip"
    on_missing_slice: Policy = "quarantine"
    on_duplicate_position: SkipOrQuarantine = "quarantine"
    on_single_slice: SkipOrQuarantine = "quarantine"
    on_gantry_tilt: Policy = "quarantine"
    on_burned_in: Policy = "quarantine"
    on_4d: Literal["split", "quarantine"] = Field(
        "split", description="series whose positions repeat per echo/time point"
    )
    dates: Literal["shift", "drop"] = "shift"
    date_shift_max_days: int = Field(365, ge=0)
    folder_labels: bool = Field(False, description="SRC/<label>/...: one folder per class")
    workers: int = Field(
        0, ge=0, description="processes over series; 0 = one per idle CPU when it pays"
    )
    parallel_min_mb: float = Field(
        512.0,
        ge=0,
        description="below this many MB of input, index and convert in-process: each spawned "
        "worker first spends ~0.6 s CPU importing, and ingest does ~6.5 ms of work per MB "
        "(with workers 0, a pool also needs idle CPUs)",
    )
    gzip_level: int = Field(1, ge=0, le=3, description="ISA-L gzip level of the volumes")
    max_voxels: int = Field(
        2**30,
        ge=1,
        description="ceiling on the voxels a file or series may claim (default 1024^3, beyond "
        "the largest real CT/MR series): larger claims are quarantined before allocation",
    )
    commit_every_s: float = Field(1.0, ge=0, description="catalog rows are committed in batches")


class PreprocessConfig(_Strict):
    """The deterministic MONAI chain whose output is cached."""

    modality: Modality = Field(
        "CT", description="intensity step (medml/data/intensity.py): CT window, MR z-score, mask"
    )
    pixdim: tuple[float, float, float] = (6.0, 6.0, 6.0)
    window: tuple[float, float] = (-1150.0, 350.0)
    spatial_size: tuple[int, int, int] = (32, 32, 32)
    foreground_threshold: float = Field(
        0.05, description="intensity after windowing above which a voxel counts as body"
    )

    def fingerprint(self) -> str:
        """Short hash that names this chain's cache folder."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class PlanConfig(_Strict):
    """How ``medml plan`` fingerprints the catalog and derives preprocessing plans
    (docs/planning.md has the rules)."""

    sample_volumes: int = Field(50, ge=1, description="volumes read for intensities (seeded)")
    voxels_per_volume: int = Field(
        100_000, ge=100, description="foreground voxels drawn per sampled volume"
    )
    seed: int = 0
    ct_body_hu: float = Field(
        -500.0, description="CT foreground: the body above this HU, holes (lungs) filled"
    )
    anisotropy_threshold: float = Field(
        3.0, gt=1, description="nnU-Net's: a low-resolution axis is this x coarser and shorter"
    )
    memory_gb: float | None = Field(
        None, gt=0, description="memory a training batch may use; null: GPU 0's, else the RAM"
    )
    memory_fraction: float = Field(
        0.5, gt=0, le=1, description="share of that memory for the batch's activations"
    )
    # ~90 B measured for resnet10 (widen 0.5, stride 2), fp32, CPU, forward + backward +
    # AdamW (bench/plan_memory.py); the default leaves room for wider backbones.
    bytes_per_voxel: float = Field(
        128.0, gt=0, description="training memory per input voxel per scan in a batch"
    )
    min_batch_size: int = Field(8, ge=2, description="the spatial size shrinks until this fits")
    max_batch_size: int = Field(32, ge=2)


class ModelConfig(_Strict):
    """Encoder: MONAI backbone + projection head + L2 normalisation."""

    backbone: Backbone = Field("resnet10", description="a name of medml/models/backbones.py")
    conv1_t_stride: int = Field(2, description="ResNets only: 2 is ~10x faster in 3D than 1")
    widen_factor: float = Field(0.5, gt=0, description="ResNets only: channel multiplier")
    embedding_dim: int = Field(128, ge=2)
    head_hidden: int = Field(256, ge=2)
    init_weights: Path | None = Field(
        None, description="local backbone state dict (e.g. MedicalNet), read with weights_only"
    )
    init_from: str | None = Field(
        None,
        description="start from a pretrained encoder: runs:/RUN_ID (of medml pretrain) or a "
        "local encoder state dict",
    )
    ensemble: int = Field(
        1, ge=1, description="encoders concatenated into one model (train.folds trains them)"
    )
    tta_flips: list[list[int]] = Field(
        default_factory=list,
        description="test-time flips averaged into the embedding, e.g. [[0]]: left-right",
    )


class LossConfig(_Strict):
    """Metric-learning loss and miner, by their names in ``medml/losses/registry.py``.

    Options left unset keep the library's own defaults (e.g. PML's ArcFace: 28.6 deg, s = 64).
    ``margin``/``scale``/``temperature`` are shortcuts for the losses that have them; any other
    constructor option goes in ``options``. ``miner`` empty: the loss's default miner
    (semi-hard for triplet); ``none``: no mining; a miner has the loss margin unless
    ``miner_options`` gives its own.
    """

    name: LossName = "triplet"
    margin: float | None = Field(None, description="triplet/cosface/proxy: distance; arcface: deg")
    scale: float | None = Field(None, description="arcface/cosface/subcenter scale s")
    temperature: float | None = Field(None, gt=0, description="supcon temperature")
    options: dict[str, Any] = Field(default_factory=dict, description="other loss arguments")
    miner: str | None = Field(None, description="a miner of the registry, or none")
    miner_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_miner(self) -> LossConfig:
        if self.miner not in (None, "none"):
            registry("medml.losses.registry", "MINERS").check(self.miner)
        return self


class SplitConfig(_Strict):
    """Patient-level split fractions (stratified by class)."""

    train: float = 0.6
    val: float = 0.2
    test: float = 0.2
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions must sum to 1")
        return self


class AugmentConfig(_Strict):
    """Random MONAI transforms applied after the cached deterministic chain (training only)."""

    enabled: bool = True
    prob: float = Field(0.5, ge=0, le=1)
    rotate_deg: float = Field(10.0, ge=0)
    scale: float = Field(0.1, ge=0, description="relative zoom range")
    flip_lr: bool = Field(True, description="left-right flips (sound for bilateral findings)")
    flip_axes: list[int] = Field(
        default_factory=list,
        description="other spatial axes (1: A-P, 2: S-I) flipped with probability 0.5 each",
    )
    noise_std: float = Field(0.02, ge=0)
    intensity_shift: float = Field(0.05, ge=0)


class TrainConfig(_Strict):
    """Optimisation settings."""

    epochs: int = Field(10, ge=1)
    m_per_class: int = Field(4, ge=2)
    batch_size: int = Field(20, ge=2)
    lr: float = Field(1e-3, gt=0)
    loss_lr: float = Field(1e-2, gt=0, description="lr of loss parameters (class weights, proxies)")
    weight_decay: float = 1e-4
    warmup_epochs: int = Field(1, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    folds: int = Field(
        1,
        ge=1,
        description=">1: one model per cross-validation fold of train+val, packaged "
        "as their ensemble (model.ensemble follows)",
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="exponential moving average of the weights (e.g. 0.99)"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val MAP@R"
    )
    amp: bool = Field(True, description="mixed precision when CUDA is present (ignored on CPU)")
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    memory_cache_mb: float = Field(
        2048.0, ge=0, description="keep preprocessed volumes in RAM too, up to this (per worker)"
    )
    experiment: str = "medml"


class PretrainConfig(_Strict):
    """Self-supervised contrastive pretraining (``medml pretrain``): SimCLR / NT-Xent."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=2, description="scans per step (2 views each)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 1e-4
    temperature: float = Field(0.1, gt=0, description="NT-Xent temperature")
    seed: int = 0
    include_test: bool = Field(False, description="also the test split's images (no labels)")
    augment: AugmentConfig = Field(
        default_factory=lambda: AugmentConfig(
            prob=0.8, rotate_deg=15.0, scale=0.15, noise_std=0.03, intensity_shift=0.1
        ),
        description="the views' augmentation (stronger than training's)",
    )


class EvaluateConfig(_Strict):
    """Retrieval metrics and few-shot episodes."""

    split: Literal["train", "val", "test"] = "test"
    ways: int = Field(5, ge=2)
    shots: int = Field(5, ge=1)
    queries: int = Field(15, ge=1)
    episodes: int = Field(600, ge=1)
    seed: int = 0
    ordinal: bool = Field(False, description="classes are ordered stages: report kappa and MAE")
    batch_size: int = Field(16, ge=1)


class PrototypeConfig(_Strict):
    """Few-shot prototypes and the registered model."""

    shots: int = Field(5, ge=1)
    seed: int = 0
    temperature: float = Field(0.1, gt=0, description="softmax temperature on cosine similarity")
    unknown_threshold: float | None = Field(
        None, description="similarity below which a scan is answered 'unknown'"
    )
    model_name: str = "medml-encoder"
    alias: str = "champion"
    target_far: float | None = Field(
        0.05, ge=0, le=1, description="false-accept rate the 'unknown' threshold is fitted for"
    )
    neighbours: int = Field(3, ge=0, description="nearest support scans listed per prediction")
    rule: str = Field(
        "centroid",
        description="decision rule (medml/fewshot/registry.py), or auto: the best of "
        "rule_candidates on the validation split",
    )
    rule_candidates: list[RuleName] = Field(
        default_factory=lambda: ["centroid", "centroid-prior", "kmeans", "knn", "linear"]
    )
    rule_options: dict[str, float] = Field(
        default_factory=dict, description="knn: k; kmeans: per_class; linear: C"
    )
    fit_temperature: bool = Field(
        False,
        description="fit the temperature of the rule by maximum likelihood on the val split "
        "(train-split prototypes) when evaluating and packaging",
    )

    @model_validator(mode="after")
    def _known_rule(self) -> PrototypeConfig:
        if self.rule != "auto":
            registry("medml.fewshot.registry", "RULES").check(self.rule)
        return self


class PredictConfig(_Strict):
    """Batch inference."""

    batch_size: int = Field(8, ge=1)
    workers: int | None = Field(
        None,
        ge=0,
        description="processes reading and preprocessing inputs ahead of the model "
        "(0/1: in the predicting process; null: one per CPU from parallel_min inputs on)",
    )
    parallel_min: int = Field(
        64, ge=1, description="inputs from which workers start (a pool takes seconds to start)"
    )
    formats: list[Literal["csv", "parquet"]] = Field(
        ["csv", "parquet"], description="output files written beside each other"
    )
    explain_method: Literal["smoothgrad", "occlusion"] = Field(
        "smoothgrad", description="saliency of --explain: MONAI SmoothGrad or occlusion"
    )
    explain_samples: int = Field(16, ge=1, description="noisy copies averaged by SmoothGrad")
    explain_mask: int = Field(8, ge=1, description="occlusion patch size (voxels) of --explain")


class OrchestrationConfig(_Strict):
    """Prefect orchestration: step caching, retries, task runner, schedules of ``medml serve``."""

    cache: bool = Field(True, description="skip pipeline steps whose inputs, config, code are same")
    cache_days: float | None = Field(30.0, gt=0, description="cached step results expire after")
    results: Path | None = Field(None, description="step results [default: WS/prefect-results]")
    retries: int = Field(3, ge=0, description="retries of I/O steps (ingest, registry, predict)")
    retry_backoff_s: float = Field(2.0, gt=0, description="first retry delay; doubles per retry")
    io_timeout_s: float | None = Field(6 * 3600.0, gt=0, description="I/O step timeout")
    train_timeout_s: float | None = Field(None, gt=0, description="train/sweep step timeout")
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="runner of map-heavy steps (ingest per series, predict per batch)"
    )
    max_workers: int = Field(4, ge=1, description="threads: mapped tasks at once")
    dask_address: str | None = Field(
        None, description="scheduler of a running Dask cluster (tcp://host:8786); none: local"
    )
    dask_workers: int = Field(2, ge=1, description="workers of the local Dask cluster")
    scans_per_task: int = Field(32, ge=1, description="batch inference: scans per mapped task")
    watch_dir: Path | None = Field(None, description="nightly predictions [default: WS/inbox]")
    predict_cron: str = "0 2 * * *"
    ingest_source: Path | None = Field(None, description="scheduled ingest [default: WS/incoming]")
    ingest_labels: Path | None = None
    ingest_cron: str | None = "0 1 * * *"
    timezone: str = "UTC"
    server_port: int = Field(4200, ge=1, le=65535, description="medml serve --start-server")
    server_start_timeout_s: float = Field(180.0, gt=0, description="wait for it to answer")


class PacsConfig(_Strict):
    """A PACS spoken to over DICOMweb (QIDO/WADO/STOW-RS) or DIMSE (C-FIND/C-GET/C-MOVE/C-STORE)
    (``medml/pacs/``). Credentials are not settings: ``MEDML_PACS_USERNAME`` and
    ``MEDML_PACS_PASSWORD`` (or ``MEDML_PACS_TOKEN``) in the environment."""

    name: str = Field("pacs", description="names this source's watermark in the catalog")
    protocol: Literal["dicomweb", "dimse"] = "dicomweb"
    dicomweb_url: str = Field(
        "http://127.0.0.1:8042/dicom-web", description="DICOMweb root (QIDO/WADO/STOW-RS)"
    )
    host: str = Field("127.0.0.1", description="DIMSE: the PACS host")
    port: int = Field(4242, ge=1, le=65535, description="DIMSE: the PACS port")
    called_aet: str = Field("ORTHANC", max_length=16, description="DIMSE: the PACS AE title")
    calling_aet: str = Field("MEDML", max_length=16, description="DIMSE: medml's AE title")
    retrieve: Literal["get", "move"] = Field(
        "get", description="DIMSE: C-GET on the query association, or C-MOVE to medml's own SCP"
    )
    modalities: list[str] = Field(["CT", "MR"], min_length=1, description="series to pull")
    series_description: str | None = Field(
        None, description="only series whose description matches (DICOM wildcards * and ?)"
    )
    since: str = Field(
        "19000101", pattern=r"^\d{8}$", description="first run: studies from this date (YYYYMMDD)"
    )
    lookback_days: int = Field(
        0,
        ge=0,
        description="search from this many days before the watermark: priors that reach the "
        "PACS late (the ledger skips series already done)",
    )
    max_series: int | None = Field(None, ge=1, description="series pulled per run at most")
    write_back: bool = Field(True, description="send one DICOM SR per predicted series")
    send_with: Literal["stow", "c-store"] | None = Field(
        None, description="how SRs go back [default: STOW-RS for dicomweb, C-STORE for dimse]"
    )
    inbox: Path | None = Field(None, description="pulled series [default: WS/pacs/inbox]")
    listen_host: str = Field("0.0.0.0", description="medml listen / C-MOVE destination: bind to")
    listen_port: int = Field(11112, ge=0, le=65535, description="medml's C-STORE SCP port")
    quiet_s: float = Field(5.0, gt=0, description="listen: a study is complete after this quiet")
    timeout_s: float = Field(30.0, gt=0, description="one PACS request (HTTP or DIMSE)")
    retries: int = Field(3, ge=0, description="retries of a PACS that is down or refuses")
    retry_backoff_s: float = Field(2.0, gt=0, description="first retry delay; doubles per retry")
    cron: str | None = Field(
        None, description="medml serve: schedule of the pacs flow, e.g. '*/15 * * * *' (none: off)"
    )
    model_uri: str | None = Field(
        None, description="model URI [default: models:/<prototypes.model_name>@champion]"
    )

    @property
    def sender(self) -> str:
        """``stow`` or ``c-store``: how SRs are sent back."""
        return self.send_with or ("stow" if self.protocol == "dicomweb" else "c-store")


class SweepConfig(_Strict):
    """The loss comparison (``medml sweep``): the Reality Check protocol's budget and tests."""

    folds: int = Field(4, ge=2, description="cross-validation folds over train+val")
    trials: int = Field(8, ge=1, description="Optuna trials per loss (the same for every loss)")
    seeds: int = Field(3, ge=1, description="final fits per loss (test evaluated once each)")
    workers: int = Field(1, ge=1, description="fits at once (> 1: a local Dask cluster)")
    epochs: int | None = Field(None, ge=1, description="epochs per trial [train.epochs]")
    fold_seed: int = Field(0, description="seed of the patient-grouped stratified folds")
    sampler_seed: int = Field(0, description="seed of Optuna's TPE sampler")
    startup_trials: int = Field(3, ge=1, description="random trials before TPE models the space")
    prune_startup_trials: int = Field(
        2, ge=0, description="finished trials before the median pruner may stop a fold"
    )
    prune_warmup_epochs: int = Field(2, ge=0, description="epochs of a fold never pruned")
    final: Literal["refit", "folds"] = Field(
        "refit",
        description="refit: seeds x one fit on all of train+val; folds: seeds x one fit per fold",
    )
    metric: str = Field("mean_average_precision_at_r", description="test metric compared")
    baseline: str = Field("softmax", description="the loss every other one must beat")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the verdict")
    bootstrap: int = Field(10000, ge=100, description="paired bootstrap resamples")
    torch_threads: int = Field(
        1, ge=1, description="torch threads per fit: results do not depend on the worker count"
    )


class Settings(_Strict):
    """The whole configuration of one project."""

    workspace: Path = Path("workspace")
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    plan: PlanConfig = PlanConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    prototypes: PrototypeConfig = PrototypeConfig()
    predict: PredictConfig = PredictConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    pacs: PacsConfig = PacsConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _fold_ensemble(self) -> Settings:
        """``train.folds`` models are packaged as one ensemble of that many encoders."""
        if self.train.folds > 1 and self.model.ensemble != self.train.folds:
            self.model = self.model.model_copy(update={"ensemble": self.train.folds})
        return self

    def single_model(self) -> Settings:
        """These settings for one member of a fold ensemble (one encoder, no folds)."""
        return self.model_copy(
            update={
                "model": self.model.model_copy(update={"ensemble": 1}),
                "train": self.train.model_copy(update={"folds": 1}),
            }
        )


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: '{key}' is not a section")
    node[leaf] = value


MAX_YAML_BYTES = 1 << 20  # a config is a few KB; anything near this is not one
MAX_YAML_ALIASES = 100  # configs need few (if any); a billion-laughs bomb needs many
MAX_YAML_NODES = 100_000  # values once aliases are expanded (a config has a few hundred)


class ConfigError(ValueError):
    """A config that cannot be read: too big, not YAML, or a YAML bomb (names file and line)."""


class _CappedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents with more than ``MAX_YAML_ALIASES`` aliases or
    more than ``MAX_YAML_NODES`` values once they are expanded.

    Aliases are how a 1 KB "billion laughs" document grows to gigabytes once anything walks
    it (validation, hashing, JSON); PyYAML has no limit of its own, so this counts them and
    measures the expansion on the node graph, before any Python object is built.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(
                    f"more than {MAX_YAML_ALIASES} aliases (line {mark.line + 1}): refused, as a "
                    "config never needs that many and a YAML bomb does"
                )
        return super().compose_node(parent, index)

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"its aliases expand to {size} values, more than the {MAX_YAML_NODES} allowed"
            )
        return self.construct_document(node)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is expanded (memoised: aliases
    share nodes, so this walks each node once however large the expansion)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a cycle (a recursive alias) counts once on its way round
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size
    return size


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML text (safe tags only, aliases capped) -> Python; errors name ``source`` and line."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {len(text)} bytes, more than the {MAX_YAML_BYTES} allowed")
    loader = _CappedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not a usable YAML config: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _read_capped(path: Path) -> str:
    with open(path, "rb") as fh:
        blob = fh.read(MAX_YAML_BYTES + 1)
    if len(blob) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than the {MAX_YAML_BYTES} bytes a config may have")
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def load_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Read a YAML config, apply ``key.sub=value`` overrides, and validate it.

    Raises :class:`ConfigError` (a ``ValueError``, naming the file and line) for files that
    are not YAML, larger than ``MAX_YAML_BYTES`` or with more than ``MAX_YAML_ALIASES``
    aliases, and pydantic's ``ValidationError`` (also a ``ValueError``) for wrong settings.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = parse_yaml(_read_capped(Path(path)), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}: a config is a mapping of sections, not {type(raw).__name__}"
            )
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), parse_yaml(text, f"--set {key.strip()}"))
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        unknown = [e for e in exc.errors() if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
        raise ValueError("\n".join(_unknown_key(e["loc"]) for e in unknown)) from None


def _unknown_key(loc: tuple) -> str:
    """``unknown key train.nope; valid keys of train: ...; did you mean ...?``"""
    model: Any = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        model = field.annotation if field is not None else None
    section = ".".join(map(str, loc[:-1])) or "the top level"
    dotted = ".".join(map(str, loc))
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return f"unknown key {dotted}"
    valid = sorted(model.model_fields)
    near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.3)
    hint = f"; did you mean {'.'.join(map(str, loc[:-1] + (near[0],)))}?" if near else ""
    return f"unknown key {dotted}; valid keys of {section}: {', '.join(valid)}{hint}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested settings to ``a.b.c`` keys (for MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
