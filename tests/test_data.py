import shutil
from pathlib import Path

import pytest
import torch

from medml.catalog import Catalog
from medml.data.dataset import cache_dir, cached_dataset, items_from_scans
from medml.workspace import Workspace


def test_transform_chain_gives_fixed_size_windowed_tensors(ingested, tiny_settings):
    scans = Catalog(ingested.catalog_url).list_scans()[:3]
    ds = cached_dataset(ingested, tiny_settings.preprocess, items_from_scans(ingested, scans, []))
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert tuple(image.shape) == (1, *tiny_settings.preprocess.spatial_size)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert float(image.std()) > 0.05  # air, lung and tissue are still told apart


def test_cache_serves_epochs_without_raw_files_and_labels_stay_current(
    tmp_path, ingested, tiny_settings
):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ingested.root, ws.root)
    shutil.rmtree(ws.cache)  # start cold
    scans = Catalog(ws.catalog_url).list_scans()[:4]
    first = cached_dataset(ws, tiny_settings.preprocess, items_from_scans(ws, scans, []))
    warm = [first[i]["image"] for i in range(len(first))]
    assert len(list(cache_dir(ws, tiny_settings.preprocess).glob("*.pt"))) == len(scans)
    for s in scans:  # the raw volumes are gone: a second epoch must come from the cache
        (ws.root / s["volume"]).unlink()
    classes = sorted({s["label"] for s in scans})
    again = cached_dataset(ws, tiny_settings.preprocess, items_from_scans(ws, scans, classes))
    for i, image in enumerate(warm):
        assert torch.equal(again[i]["image"], image)
        assert again[i]["label"] == classes.index(scans[i]["label"])


def test_changed_chain_uses_another_cache_folder(tiny_settings):
    other = tiny_settings.preprocess.model_copy(update={"window": (-1000.0, 200.0)})
    ws = Workspace(Path("ws"))
    assert cache_dir(ws, other) != cache_dir(ws, tiny_settings.preprocess)


def test_ram_tier_serves_later_epochs_within_its_budget(tmp_path, ingested, tiny_settings):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ingested.root, ws.root)
    scans = Catalog(ws.catalog_url).list_scans()[:4]
    items = items_from_scans(ws, scans, [])
    one_mb = 2**20
    volume_bytes = 4 * int(torch.tensor(tiny_settings.preprocess.spatial_size).prod())
    budget_mb = 2.5 * volume_bytes / one_mb  # room for two volumes, not three
    ds = cached_dataset(ws, tiny_settings.preprocess, items, memory_mb=budget_mb)
    first = [ds[i]["image"] for i in range(len(ds))]
    shutil.rmtree(ws.cache)  # the disk cache is gone; the raw volumes too
    for s in scans:
        (ws.root / s["volume"]).unlink()
    assert all(torch.equal(ds[i]["image"], first[i]) for i in range(2))  # from RAM
    with pytest.raises(RuntimeError):  # beyond the budget: it needs the (deleted) files again
        ds[2]
