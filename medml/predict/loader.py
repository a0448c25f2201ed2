"""Load a packaged medml model without running any code from the artifact store.

The model is logged as an MLflow pyfunc whose ``loader_module`` is this module: MLflow imports
the *installed* medml and calls :func:`_load_pyfunc` with the model's ``data`` folder, which holds
only data: ``encoder.pt`` (a state dict, ``torch.load(weights_only=True)``), ``prototypes.npz``
(``allow_pickle=False``), ``settings.yaml`` (``yaml.safe_load``) and ``sha256.json``, the SHA-256
of each of them recorded when the model was logged. Every file is checked against its hash
before it is read; a mismatch is refused. The same hashes are tagged on the MLflow run
(``medml.sha256.<digest>``) in the tracking store, so medml's own loading (:func:`open_model`) also
catches an artifact store rewritten together with its manifest.

Models logged by older medml versions "from code" (MLflow executed the stored
``mlflow_entry.py`` on every load) are never loaded through MLflow: :func:`open_model` reads
their three data files directly, without their code, and warns how to re-register them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from medml.predict.pyfunc import MedmlModel

LOADER_MODULE = "medml.predict.loader"
MANIFEST = "sha256.json"
ARTIFACTS = {"encoder": "encoder.pt", "prototypes": "prototypes.npz", "settings": "settings.yaml"}
RUN_TAG = "medml.sha256"  # + "." + manifest_digest(...): a manifest logged in that run

log = logging.getLogger(__name__)


class TamperedModelError(RuntimeError):
    """A model file does not match the hash recorded when the model was logged."""


class ModelNotFoundError(LookupError):
    """The model URI names nothing in the tracking store; the message lists what exists."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict[str, str]:
    """Hash the model's data files into ``folder/sha256.json``; return the hashes."""
    hashes = {name: sha256_file(folder / name) for name in ARTIFACTS.values()}
    (folder / MANIFEST).write_text(json.dumps(hashes, indent=1, sort_keys=True))
    return hashes


def manifest_digest(hashes: dict[str, str]) -> str:
    """A short digest of a manifest, the suffix of its run tag (one run may log several
    models: the training run is packaged again with other settings)."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:32]


def run_tag(hashes: dict[str, str]) -> str:
    return f"{RUN_TAG}.{manifest_digest(hashes)}"


def verify(folder: Path, tracked: set[str] | None = None) -> dict[str, str]:
    """Check each data file against the manifest, and the manifest against the run tags
    ``tracked`` (when the run has any); the hashes."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise TamperedModelError(f"model data has no readable {MANIFEST}: refusing it") from exc
    if tracked and run_tag(recorded) not in tracked:
        raise TamperedModelError(
            f"the model's {MANIFEST} differs from the hashes recorded in the tracking store "
            "when it was logged: the artifact store was modified; refusing to load it"
        )
    for name in ARTIFACTS.values():
        actual = sha256_file(folder / name) if (folder / name).is_file() else "missing"
        if actual != recorded.get(name):
            raise TamperedModelError(
                f"model file {name} does not match the SHA-256 recorded when the model was "
                f"logged ({actual[:12]} vs {str(recorded.get(name))[:12]}): the artifact store "
                "was modified; refusing to load it"
            )
    return recorded


def load_folder(folder: Path, tracked: set[str] | None = None) -> MedmlModel:
    """A :class:`MedmlModel` from a verified data folder."""
    folder = Path(folder)
    verify(folder, tracked)
    return _from_files(folder)


def _from_files(folder: Path) -> MedmlModel:
    return MedmlModel().load(
        *(folder / ARTIFACTS[k] for k in ("encoder", "prototypes", "settings"))
    )


class PyfuncAdapter:
    """What MLflow's ``PyFuncModel`` wraps: ``predict(frame)``, and the model as ``python_model``
    (so ``unwrap_python_model()`` works as for a ``PythonModel``)."""

    def __init__(self, model: MedmlModel) -> None:
        self.python_model = model

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.python_model.predict(None, model_input, params)


def _load_pyfunc(data_path: str) -> PyfuncAdapter:
    """MLflow's entry point (``loader_module``): the verified model in ``data_path``."""
    return PyfuncAdapter(load_folder(Path(data_path)))


# ----------------------------------------------------------------------- medml's own loading


@dataclass(frozen=True)
class OpenedModel:
    model: MedmlModel
    model_id: str  # the MLflow model uuid: a new version, a new id (the ledger's key)


def open_model(model_uri: str) -> OpenedModel:
    """Download ``model_uri``, check how it was logged, and load it without running its code.

    Unknown models and aliases raise :class:`ModelNotFoundError` listing what exists.
    """
    with tempfile.TemporaryDirectory(prefix="medml-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        except (MlflowException, OSError) as exc:
            raise ModelNotFoundError(describe_missing(model_uri, exc)) from exc
        meta = Model.load(str(local / "MLmodel"))
        conf = meta.flavors.get("python_function", {})
        if conf.get("loader_module") == LOADER_MODULE:
            model = load_folder(local / conf.get("data", "data"), _tracked_hashes(meta))
        elif (local / "artifacts" / ARTIFACTS["settings"]).is_file():
            model = _load_legacy(model_uri, local / "artifacts")
        else:
            raise ValueError(f"{model_uri} is not a medml model (no medml loader, no artifacts)")
    return OpenedModel(model, meta.model_uuid or model_uri)


def _tracked_hashes(meta: Model) -> set[str] | None:
    """The manifest tags of the model's run in the tracking store (None if unreachable)."""
    if not meta.run_id:
        return None
    try:
        tags = mlflow.MlflowClient().get_run(meta.run_id).data.tags
    except MlflowException:
        return None
    return {k for k in tags if k.startswith(RUN_TAG + ".")}


def _load_legacy(model_uri: str, artifacts: Path) -> MedmlModel:
    """A model logged "from code" by an older medml: its data files only, never its code."""
    log.warning(
        "%s was logged by an older medml as MLflow 'models from code': medml loads its weights, "
        "prototypes and settings without running its stored code, but they carry no recorded "
        "hashes, and `mlflow models serve` would run that code. Re-register it: "
        "`medml prototypes -m %s --support SUPPORT --register NAME` (or re-run `medml train`) "
        "logs a version that loads from the installed medml with verified hashes.",
        model_uri,
        model_uri,
    )
    return _from_files(artifacts)


def describe_missing(model_uri: str, exc: Exception) -> str:
    """Why ``model_uri`` was not found: the registered models with their versions and aliases,
    and the tracking store searched."""
    store = mlflow.get_tracking_uri()
    head = f"model {model_uri} not found in the tracking store {store}"
    if not model_uri.startswith("models:/"):
        return f"{head} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    name = model_uri.removeprefix("models:/").split("@", 1)[0].split("/", 1)[0]
    client = mlflow.MlflowClient()
    try:
        models = client.search_registered_models()
    except MlflowException:
        models = []
    lines = []
    for rm in models:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{rm.name}'"))
        aliases = ", ".join(f"@{a}" for a in sorted(rm.aliases or {})) or "no aliases"
        lines.append(f"  {rm.name}: versions {', '.join(map(str, versions)) or '-'}; {aliases}")
    if not lines:
        return f"{head}: it has no registered models (run `medml pipeline` or `medml prototypes`)"
    which = "versions and aliases" if any(rm.name == name for rm in models) else "models"
    return f"{head}. Registered {which}:\n" + "\n".join(lines)
