"""The workspace: every piece of a project's state under one folder (see ARCHITECTURE.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """Paths of the workspace contract."""

    root: Path

    @classmethod
    def resolve(cls, explicit: str | Path | None = None) -> Workspace:
        """``--workspace`` wins, then ``$MEDML_WORKSPACE``, then ``./workspace``."""
        chosen = explicit or os.environ.get("MEDML_WORKSPACE") or "workspace"
        return cls(Path(chosen).expanduser().resolve())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def catalog_url(self) -> str:
        return os.environ.get("MEDML_CATALOG_URL") or f"sqlite:///{self.root / 'catalog.db'}"

    @property
    def mlflow_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI`` when the user set it, else SQLite in the workspace."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlartifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def secret_file(self) -> Path:
        return self.root / ".deid-secret"

    def volume_path(self, scan_id: str) -> Path:
        return self.volumes / f"{scan_id}.nii.gz"

    def ensure(self) -> Workspace:
        for path in (self.root, self.volumes, self.cache, self.reports, self.checkpoints):
            path.mkdir(parents=True, exist_ok=True)
        return self
