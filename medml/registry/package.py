"""Package a trained encoder as the deployable MLflow pyfunc: weights, prototypes, settings.

Loading a packaged model never unpickles anything and never runs code from the artifact store:
the encoder is a state dict read with ``torch.load(weights_only=True)``, the prototypes an
``.npz`` without pickles, the settings YAML, each checked against its SHA-256 first
(:mod:`medml.predict.loader`).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import mlflow
import torch
import yaml

import medml
from medml.config import Settings
from medml.evaluate.run import decision_setup, embed_training_split
from medml.fewshot.prototypes import Prototypes, build_prototypes
from medml.models.encoder import Encoder, load_encoder
from medml.planning import resolve
from medml.predict.loader import ARTIFACTS, LOADER_MODULE, run_tag, write_manifest
from medml.predict.pyfunc import signature
from medml.workspace import Workspace


def log_model(
    encoder: Encoder, prototypes: Prototypes, settings: Settings, registered_name: str | None = None
) -> mlflow.models.model.ModelInfo:
    """Log (and optionally register) the pyfunc under the active run as ``model``.

    The model's ``loader_module`` is :mod:`medml.predict.loader` (code of the installed medml,
    never a file in the artifact store); its data folder holds the three artifacts and their
    SHA-256, which are also tagged on the run (``medml.sha256.<digest>``) in the tracking store.
    """
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # An input example would need a real scan; the signature documents the input instead.
        warnings.filterwarnings("ignore", message=".*input example.*")
        data = Path(tmp) / "data"
        data.mkdir()
        torch.save(encoder.state_dict(), data / ARTIFACTS["encoder"])
        prototypes.save(data / ARTIFACTS["prototypes"])
        (data / ARTIFACTS["settings"]).write_text(yaml.safe_dump(settings.model_dump(mode="json")))
        hashes = write_manifest(data)
        mlflow.set_tag(run_tag(hashes), json.dumps(hashes, sort_keys=True))
        return mlflow.pyfunc.log_model(
            name="model",
            loader_module=LOADER_MODULE,
            data_path=str(data),
            signature=signature(prototypes.classes),
            registered_model_name=registered_name,
            metadata={
                "medml_version": medml.__version__,
                "classes": prototypes.classes,
                "sha256": hashes,
            },
            pip_requirements=[f"medml=={medml.__version__}"],
        )


def package_run(run_id: str, settings: Settings, ws: Workspace, checkpoint: Path) -> str:
    """Log a training run's best encoder with prototypes of its training split; the model URI.

    The prototypes are the renormalised means of the train split's base-class embeddings, so
    the packaged model predicts as the run's nearest-centroid metrics were measured.
    """
    settings = resolve(settings, ws)  # as training saw them, and saved with the model
    encoder = load_encoder(settings.model, checkpoint)
    train = embed_training_split(encoder, ws, settings.preprocess, settings.evaluate.batch_size)
    pc = settings.prototypes
    setup = decision_setup(encoder, settings, ws, train)
    protos = build_prototypes(
        train.emb, train.labels, setup.temperature, pc.unknown_threshold, rule=setup.rule,
        rule_options=pc.rule_options,
    )  # fmt: skip
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = log_model(encoder, protos, settings)
    return info.model_uri
