"""The recipe's parts on tiny data: test-time flips, weight averaging, contrastive pretraining."""

import shutil

import torch
import torch.nn.functional as F

from medml.config import ModelConfig
from medml.models.encoder import build_encoder
from medml.train.hooks import WeightAveraging
from medml.train.pretrain import load_initial_weights, pretrain
from medml.workspace import Workspace

TINY = {"backbone": "resnet10", "widen_factor": 0.25, "embedding_dim": 8, "head_hidden": 16}


def test_tta_embedding_is_the_renormalised_mean_of_the_flipped_embeddings():
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(**TINY, tta_flips=[[0], [1, 2]])).eval()
    x = torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        views = [enc.embed(x), enc.embed(x.flip(2)), enc.embed(x.flip((3, 4)))]
        expected = F.normalize(torch.stack(views).mean(0), dim=1)
        assert torch.allclose(enc(x), expected, atol=1e-6)
        assert not torch.allclose(enc(x), views[0], atol=1e-4)  # it did average something
        enc.train()
        assert torch.allclose(enc(x), enc.embed(x))  # never during training


def test_weight_averaging_follows_the_ema_rule_and_replaces_the_evaluated_encoder():
    class Stub:
        pass

    torch.manual_seed(0)
    trainer = Stub()
    trainer.encoder = torch.nn.Linear(3, 2)
    hook = WeightAveraging(decay=0.9)
    hook.on_fit_start(trainer)
    assert trainer.eval_encoder is hook.ema.module and trainer.eval_encoder is not trainer.encoder
    start = trainer.encoder.weight.detach().clone()
    with torch.no_grad():
        trainer.encoder.weight.add_(1.0)
    hook.on_step_end(trainer)
    # the first update copies; from the second on: ema = 0.9 ema + 0.1 param
    assert torch.allclose(hook.ema.module.weight, start + 1.0)
    with torch.no_grad():
        trainer.encoder.weight.add_(1.0)
    hook.on_step_end(trainer)
    assert torch.allclose(hook.ema.module.weight, 0.9 * (start + 1) + 0.1 * (start + 2))


def test_pretraining_lowers_its_loss_and_training_can_start_from_it(
    tmp_path, ingested, tiny_settings
):
    shutil.copytree(ingested.root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    for sub in ("checkpoints", "mlartifacts"):
        shutil.rmtree(ws.root / sub, ignore_errors=True)
    (ws.root / "mlflow.db").unlink(missing_ok=True)
    settings = tiny_settings.model_copy(
        update={
            "pretrain": tiny_settings.pretrain.model_copy(
                update={"epochs": 6, "batch_size": 6, "lr": 3e-3}
            )
        }
    )
    result = pretrain(settings, ws, progress=False)
    assert len(result.losses) == 6
    assert result.losses[-1] < result.losses[0], result.losses
    fresh = build_encoder(settings.model)
    loaded = load_initial_weights(fresh, f"runs:/{result.run_id}")
    assert loaded == len(fresh.state_dict())
    saved = torch.load(result.checkpoint, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def test_fold_ensemble_embedding_concatenates_members_and_averages_their_similarities():
    from medml.models.encoder import EnsembleEncoder

    torch.manual_seed(0)
    members = [build_encoder(ModelConfig(**TINY)).eval() for _ in range(3)]
    ens = EnsembleEncoder(members).eval()
    x = torch.randn(4, 1, 16, 16, 16)
    with torch.no_grad():
        e = ens(x)
        parts = [m(x) for m in members]
    assert e.shape == (4, 3 * TINY["embedding_dim"])
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    mean_sim = torch.stack([p[0] @ p[1] for p in parts]).mean()
    assert torch.allclose(e[0] @ e[1], mean_sim, atol=1e-5)


def test_train_folds_packs_one_model_per_fold(tmp_path, ingested, tiny_settings):
    from medml.catalog import Catalog
    from medml.config import load_settings
    from medml.data.splits import ensure_splits, patient_folds
    from medml.models.encoder import EnsembleEncoder, load_encoder
    from medml.train import train

    shutil.copytree(ingested.root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    (ws.root / "mlflow.db").unlink(missing_ok=True)
    settings = load_settings(None, []).model_validate(
        {**tiny_settings.model_dump(), "train": {**tiny_settings.train.model_dump(), "folds": 2,
                                                 "epochs": 1}}
    )  # fmt: skip
    assert settings.model.ensemble == 2  # follows train.folds
    ensure_splits(Catalog(ws.catalog_url), settings.split)
    pool = [s for sp in ("train", "val") for s in Catalog(ws.catalog_url).list_scans(sp)]
    assert len(pool) >= 4
    for fit, held in patient_folds(pool, 2):
        assert not {s["patient_key"] for s in fit} & {s["patient_key"] for s in held}
    result = train(settings, ws, progress=False)
    encoder = load_encoder(settings.model, result.checkpoint)
    assert isinstance(encoder, EnsembleEncoder) and len(encoder.members) == 2


def test_flips_are_switched_off_where_classes_are_left_and_right(tmp_path):
    import numpy as np

    from medml.config import load_settings
    from medml.importers import ImportedScan, store
    from medml.planning import resolve

    recipe = load_settings("configs/medmnist3d.yaml")
    assert recipe.augment.flip_lr and recipe.model.tta_flips

    def workspace(name, labels):
        ws = Workspace(tmp_path / name)
        scans = [
            ImportedScan(f"s{i}", np.full((4, 4, 4), i, np.uint8), np.eye(4), label, "train",
                         "CT", "test")
            for i, label in enumerate(labels)
        ]  # fmt: skip
        store(ws, scans, "test")
        return ws

    organs = resolve(recipe, workspace("organs", ["kidney-left", "kidney-right", "liver"]))
    assert not organs.augment.flip_lr and organs.augment.flip_axes == []
    assert organs.model.tta_flips == []
    glands = resolve(recipe, workspace("glands", ["normal", "hyperplasia"]))
    assert glands.augment == recipe.augment and glands.model.tta_flips == recipe.model.tta_flips
