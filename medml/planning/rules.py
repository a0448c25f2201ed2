"""From a fingerprint to plans: the rules, each a short function (docs/planning.md).

After nnU-Net v2's ``ExperimentPlanner``: the target spacing is the median spacing, except on a
strongly anisotropic axis; the network input is the median field of view at that spacing,
shrunk until a minimum batch fits the memory at hand; CT gets a window from its foreground
percentiles, MR a z-score, binary masks a plain 0..1 scaling.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from datetime import UTC, datetime

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medml.config import Modality, PlanConfig
from medml.extensions import registry
from medml.planning.fingerprint import Fingerprint

PLANS_VERSION = 1
Triple = tuple[float, float, float]
Size = tuple[int, int, int]


class Plans(BaseModel):
    """What ``medml plan`` proposes; ``resolve`` turns it into preprocessing defaults."""

    model_config = ConfigDict(extra="forbid")

    version: int = PLANS_VERSION
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    catalog_digest: str
    modality: Modality
    pixdim: Triple
    spatial_size: Size
    window: tuple[float, float] | None = Field(None, description="CT only: [p0.5, p99.5] HU")
    foreground_threshold: float | None = Field(None, description="set for masks: no crop")
    batch_size: int
    anisotropic: bool
    memory_gb: float
    memory_source: str
    class_counts: dict[str, dict[str, int]]
    notes: list[str] = []
    fingerprint: Fingerprint

    def preprocess_defaults(self) -> dict[str, object]:
        """The ``preprocess`` keys these plans decide (window only for CT, threshold for masks)."""
        keys = {"modality": self.modality, "pixdim": self.pixdim, "spatial_size": self.spatial_size}
        if self.window is not None:
            keys["window"] = self.window
        if self.foreground_threshold is not None:
            keys["foreground_threshold"] = self.foreground_threshold
        return keys


def memory_at_hand() -> tuple[float, str]:
    """GiB a training batch may use here: GPU 0's memory when ``nvidia-smi`` answers (training
    picks CUDA when present), else the machine's RAM. Totals, not what is free now, so the
    same machine always gets the same plans."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "--id=0"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            return round(float(out.split()[0]) / 1024, 2), "GPU 0 (nvidia-smi)"
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass  # no usable GPU after all: plan for the CPU
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return round(ram, 2), "RAM"


def majority_modality(fp: Fingerprint) -> tuple[str, list[str]]:
    """The catalog's most frequent modality; a note when others are present (one chain)."""
    ranked = sorted(fp.modalities.items(), key=lambda kv: (-kv[1], kv[0]))
    notes = []
    if len(ranked) > 1:
        mix = ", ".join(f"{m} ({n})" for m, n in ranked)
        notes.append(
            f"the catalog mixes modalities {mix}: the chain has one intensity step, planned for "
            f"{ranked[0][0]}; preprocess the others with a config of their own"
        )
    return ranked[0][0], notes


def target_spacing(fp: Fingerprint, threshold: float) -> tuple[Triple, bool]:
    """Median spacing per axis; nnU-Net's rule for one coarse axis with few voxels: its 10th
    percentile spacing instead (no finer than the other axes), so that the thickest-slice scans
    are not upsampled into interpolation artefacts."""
    median = np.array(fp.spacing.median)
    size = np.array(fp.shape.median)
    worst = int(np.argmax(median))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = median[worst] > threshold * max(median[others])
    aniso_voxels = size[worst] * threshold < min(size[others])
    anisotropic = bool(aniso_spacing and aniso_voxels)
    target = median.copy()
    if anisotropic:
        target[worst] = max(fp.spacing.p10[worst], max(median[others]))
    x, y, z = (round(float(v), 4) for v in target)
    return (x, y, z), anisotropic


def rounding_step(size: np.ndarray) -> int:
    """Multiples of 8 (conv-friendly), or of 4 for tiny data (largest axis under 48 voxels)."""
    return 4 if size.max() < 48 else 8


def round_to(size: np.ndarray, step: int, down: bool = False) -> Size:
    rounded = np.floor(size / step) if down else np.round(size / step)
    return tuple(int(v) for v in np.maximum(rounded, 1) * step)  # type: ignore[return-value]


def median_size(fp: Fingerprint, pixdim: Triple) -> np.ndarray:
    """The median field of view (mm per axis) in voxels of ``pixdim``."""
    return np.array(fp.extent_mm.median) / np.array(pixdim)


def batch_for(spatial: Size, budget_bytes: float, cfg: PlanConfig, n_labelled: int) -> int:
    """As many scans of ``spatial`` as fit ``budget_bytes``, at most ``cfg.max_batch_size`` and
    the labelled scans at hand, at least 2. One scan of V voxels costs ``V *
    cfg.bytes_per_voxel``."""
    fits = int(budget_bytes // (math.prod(spatial) * cfg.bytes_per_voxel))
    return max(2, min(fits, cfg.max_batch_size, max(n_labelled, 2)))


def fit_memory(
    size: np.ndarray, budget_bytes: float, cfg: PlanConfig, n_labelled: int
) -> tuple[Size, int]:
    """Spatial size and batch size for ``budget_bytes`` of activations.

    ``size`` is rounded to the step; while ``cfg.min_batch_size`` scans do not fit, every axis
    shrinks by the same factor (rounded down to the step). Then ``batch_for``.
    """
    step = rounding_step(size)
    spatial = round_to(size, step)
    per_scan = math.prod(spatial) * cfg.bytes_per_voxel
    while cfg.min_batch_size * per_scan > budget_bytes and max(spatial) > step:
        shrink = (budget_bytes / (cfg.min_batch_size * per_scan)) ** (1 / 3)
        spatial = round_to(np.array(spatial) * min(shrink, 0.99), step, down=True)
        per_scan = math.prod(spatial) * cfg.bytes_per_voxel
    return spatial, batch_for(spatial, budget_bytes, cfg, n_labelled)


def budget_bytes(memory_gb: float, cfg: PlanConfig) -> float:
    """The share of ``memory_gb`` a batch's activations may take."""
    return memory_gb * 2**30 * cfg.memory_fraction


def n_labelled(fp: Fingerprint) -> int:
    return sum(sum(c.values()) for c in fp.class_counts.values())


def ct_window(fp: Fingerprint, modality: str) -> tuple[float, float] | None:
    """CT: the 0.5th to 99.5th percentile of the foreground (nnU-Net's CT clipping range)."""
    stats = fp.intensity.get(modality)
    if modality != "CT" or stats is None:
        return None
    return (round(stats.p00_5), round(stats.p99_5))


def make_plans(
    fp: Fingerprint, memory_gb: float | None = None, cfg: PlanConfig | None = None
) -> Plans:
    """Apply the rules to ``fp``; ``memory_gb`` (else ``cfg.memory_gb``, else what this machine
    has) bounds the batch."""
    cfg = cfg or PlanConfig()
    memory_gb = memory_gb or cfg.memory_gb
    source = "given"
    if memory_gb is None:
        memory_gb, source = memory_at_hand()
    modality, notes = majority_modality(fp)
    mask = fp.binary.get(modality, False)
    pixdim, anisotropic = target_spacing(fp, cfg.anisotropy_threshold)
    budget = budget_bytes(memory_gb, cfg)
    spatial, batch = fit_memory(median_size(fp, pixdim), budget, cfg, n_labelled(fp))
    if cfg.min_batch_size * math.prod(spatial) * cfg.bytes_per_voxel > budget:
        notes.append(
            f"{memory_gb:g} GiB do not fit {cfg.min_batch_size} scans even of "
            f"{'x'.join(map(str, spatial))} voxels: batch {batch} may not fit either"
        )
    known = registry("medml.data.intensity", "INTENSITY")  # by name: data is a layer above
    if mask:
        notes.append(f"{modality} volumes are binary (0/1 or 0/255): planned as masks")
    elif modality not in known:
        notes.append(f"modality {modality}: no intensity step of its own, planned as MR (z-score)")
    planned = "mask" if mask else (modality if modality in known else "MR")
    window = None if mask else ct_window(fp, modality)
    if planned == "CT" and window is None:
        notes.append("no CT foreground in the sampled volumes: no window planned")
    return Plans(
        catalog_digest=fp.catalog_digest,
        modality=planned,
        pixdim=pixdim,
        spatial_size=spatial,
        window=window,
        # a mask's crop-and-resize would erase the object's size, which is part of the signal
        foreground_threshold=-1.0 if mask else None,
        batch_size=batch,
        anisotropic=anisotropic,
        memory_gb=memory_gb,
        memory_source=source,
        class_counts=fp.class_counts,
        notes=notes + list(fp.notes),
        fingerprint=fp,
    )
