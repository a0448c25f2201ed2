"""Datasets over catalog rows, cached on disk by MONAI's PersistentDataset.

The cache folder is named by the fingerprint of the preprocessing config, so a changed chain
never reads stale tensors, and epochs after the first read no raw files (and, for training,
no files at all while the volumes fit ``train.memory_cache_mb``). Only the image goes
through the cache: labels and ids are attached afresh on every read, so relabelling a scan
never needs a new cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import PersistentDataset
from torch.utils.data import Dataset

from medml.catalog import Catalog
from medml.config import PreprocessConfig, SplitConfig
from medml.data.splits import ensure_splits
from medml.data.transforms import KEY, deterministic_chain
from medml.lock import writes_workspace
from medml.workspace import Workspace


def cache_dir(ws: Workspace, cfg: PreprocessConfig) -> Path:
    return ws.cache / cfg.fingerprint()


def items_from_scans(
    ws: Workspace, scans: Sequence[dict[str, Any]], classes: Sequence[str]
) -> list[dict[str, Any]]:
    """Data dicts: image path, content hash, integer label (-1 when not in ``classes``), scan id."""
    index = {c: i for i, c in enumerate(classes)}
    return [
        {
            KEY: str(ws.root / s["volume"]),
            "content_hash": s.get("content_hash") or "",
            "label": index.get(s.get("label"), -1),
            "scan_id": s["scan_id"],
        }
        for s in scans
    ]


def _volume_key(item: dict[str, Any]) -> bytes:
    """Cache key: the volume path and its content hash, so a changed volume is recomputed."""
    return hashlib.md5(f"{item[KEY]}|{item['content_hash']}".encode()).hexdigest().encode()


class CachedVolumes(Dataset):
    """Preprocessed image tensors from the persistent cache, with current labels attached.

    With ``memory_mb`` > 0, tensors read once stay in RAM up to that many MB (per DataLoader
    worker): from the second epoch on, training then reads no files at all. Consumers must not
    modify the returned tensors in place (collation copies them; augmentation runs on batches).
    """

    def __init__(
        self,
        ws: Workspace,
        cfg: PreprocessConfig,
        items: Sequence[dict[str, Any]],
        memory_mb: float = 0.0,
    ):
        self._memory: dict[int, torch.Tensor] = {}
        self._room = int(memory_mb * 2**20)
        folder = cache_dir(ws, cfg)
        folder.mkdir(parents=True, exist_ok=True)
        self.items = list(items)
        self.images = PersistentDataset(
            [{KEY: it[KEY], "content_hash": it["content_hash"]} for it in self.items],
            transform=deterministic_chain(cfg),
            cache_dir=folder,
            hash_func=_volume_key,
        )

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> torch.Tensor:
        """The preprocessed image of item ``i``: from RAM, else from the disk cache."""
        img = self._memory.get(i)
        if img is None:
            img = self.images[i][KEY]
            size = img.element_size() * img.nelement()
            if size <= self._room:
                self._memory[i] = img
                self._room -= size
        return img

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            KEY: self.image(i),
            "label": self.items[i]["label"],
            "scan_id": self.items[i]["scan_id"],
        }


def cached_dataset(
    ws: Workspace, cfg: PreprocessConfig, items: Sequence[dict[str, Any]], memory_mb: float = 0.0
) -> CachedVolumes:
    """Dataset of the deterministic chain, cached under ``ws/cache/<fingerprint>`` (and in RAM
    up to ``memory_mb``)."""
    return CachedVolumes(ws, cfg, items, memory_mb)


@writes_workspace("preprocess")  # it assigns splits in the catalog: one writer at a time
def preprocess_catalog(ws: Workspace, split: SplitConfig, cfg: PreprocessConfig) -> dict[str, Any]:
    """Assign missing patient-level splits, then run every labelled scan through the chain into
    the persistent cache, so training epochs read no raw file. Returns counts per split."""
    scans = ensure_splits(Catalog(ws.catalog_url), split)
    dataset = cached_dataset(ws, cfg, items_from_scans(ws, scans, []))
    for i in range(len(dataset)):
        dataset.image(i)
    splits: dict[str, int] = {}
    for s in scans:
        splits[str(s["split"])] = splits.get(str(s["split"]), 0) + 1
    return {"cached": len(dataset), "splits": splits}
