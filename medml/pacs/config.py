"""The ``pacs:`` settings section: which PACS to ask, what to pull, where results go.

Credentials are never settings: they come from the environment (``MEDML_PACS_USERNAME`` and
``MEDML_PACS_PASSWORD``, or ``MEDML_PACS_TOKEN`` for a bearer token), so they reach neither the
config files nor MLflow, where the settings are logged as parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

USERNAME_ENV = "MEDML_PACS_USERNAME"
PASSWORD_ENV = "MEDML_PACS_PASSWORD"
TOKEN_ENV = "MEDML_PACS_TOKEN"


class PacsConfig(BaseModel):
    """A PACS spoken to over DICOMweb (QIDO/WADO/STOW-RS) or DIMSE (C-FIND/C-GET/C-MOVE/C-STORE)."""

    model_config = ConfigDict(extra="forbid")

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


def credentials() -> tuple[str, str] | None:
    """``(username, password)`` from the environment, or None."""
    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    return (user, password or "") if user else None


def token() -> str | None:
    """A bearer token from the environment, or None."""
    return os.environ.get(TOKEN_ENV) or None
