"""Settings: one pydantic model per pipeline step, loaded from ``configs/*.yaml``.

Every tunable lives here with its default; code never hides constants of its own.
``--set key.sub=value`` overrides are applied to the raw YAML before validation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthConfig(_Strict):
    """Synthetic dataset written by ``medml synth``."""

    kind: Literal["covid-ct"] = "covid-ct"
    n_patients: int = Field(60, ge=1)
    seed: int = 0
    format: Literal["dicom", "nifti", "mixed"] = "mixed"
    matrix: int = Field(96, ge=16, description="in-plane matrix size (voxels)")
    fov_mm: float = Field(360.0, gt=0, description="in-plane field of view")
    z_extent_mm: float = Field(240.0, gt=0, description="cranio-caudal coverage")
    slice_thickness_mm: tuple[float, float] = (4.0, 8.0)
    followup_fraction: float = Field(0.2, ge=0, le=1, description="patients with a 2nd study")
    difficulty: float = Field(
        1.0, ge=0, description="scales nuisances and class overlap; 0 makes classes clean"
    )


class IngestConfig(_Strict):
    """How ``medml ingest`` treats its input."""

    allow_burned_in: bool = False
    min_slices: int = Field(2, ge=1)


class PreprocessConfig(_Strict):
    """The deterministic MONAI chain whose output is cached."""

    modality: Literal["CT", "MR"] = "CT"
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


class ModelConfig(_Strict):
    """Encoder: MONAI backbone + projection head + L2 normalisation."""

    backbone: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet10"
    conv1_t_stride: int = 2
    widen_factor: float = Field(0.5, gt=0)
    embedding_dim: int = Field(128, ge=2)
    head_hidden: int = Field(256, ge=2)


class LossConfig(_Strict):
    """Metric-learning loss and miner (pytorch-metric-learning)."""

    name: Literal["triplet"] = "triplet"
    margin: float = 0.2
    miner: Literal["semihard", "hard", "all"] = "semihard"


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


class TrainConfig(_Strict):
    """Optimisation settings."""

    epochs: int = Field(10, ge=1)
    m_per_class: int = Field(4, ge=2)
    batch_size: int = Field(20, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 1e-4
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    experiment: str = "medml"


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


class PredictConfig(_Strict):
    """Batch inference."""

    batch_size: int = Field(8, ge=1)


class Settings(_Strict):
    """The whole configuration of one project."""

    workspace: Path = Path("workspace")
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    prototypes: PrototypeConfig = PrototypeConfig()
    predict: PredictConfig = PredictConfig()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: '{key}' is not a section")
    node[leaf] = value


def load_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Read a YAML config, apply ``key.sub=value`` overrides, and validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(text))
    return Settings.model_validate(raw)


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
