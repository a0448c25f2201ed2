import shutil
from pathlib import Path

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
