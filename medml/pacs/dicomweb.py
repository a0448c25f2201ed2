"""DICOMweb (dicomweb-client): QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Retries: dicomweb-client's own retrying is switched off so that both protocols follow
``pacs.retries`` / ``pacs.retry_backoff_s`` through :func:`medml.pacs.source.with_retries`:
connection errors, timeouts and "try later" answers (408, 429, 502, 503, 504) are retried with
doubling delays, then reported as :class:`PacsUnavailable`; other HTTP errors are refusals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter

from medml.pacs.config import PacsConfig, credentials, token
from medml.pacs.source import PacsError, SeriesRef, with_retries, write_instances

TRY_LATER = {408, 429, 502, 503, 504}


class _TryLater(ConnectionError):
    """An HTTP answer that means "not now" (the PACS is starting, overloaded or behind a proxy)."""


TRANSIENT = (requests.ConnectionError, requests.Timeout, _TryLater)
SERIES_FIELDS = ["StudyDate", "Modality", "NumberOfSeriesRelatedInstances", "SeriesDescription"]


class _Timeout(HTTPAdapter):
    """An adapter that gives every request the configured timeout."""

    def __init__(self, timeout_s: float, **kwargs) -> None:
        self.timeout_s = timeout_s
        super().__init__(**kwargs)

    def send(self, request, **kwargs):  # type: ignore[override]
        kwargs["timeout"] = kwargs.get("timeout") or self.timeout_s
        return super().send(request, **kwargs)


def session(cfg: PacsConfig) -> requests.Session:
    """A requests session with credentials from the environment and the configured timeout."""
    s = requests.Session()
    if (user_pass := credentials()) is not None:
        s.auth = user_pass
    if (bearer := token()) is not None:
        s.headers["Authorization"] = f"Bearer {bearer}"
    adapter = _Timeout(cfg.timeout_s)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


class DicomwebSource:
    """A PACS over DICOMweb."""

    def __init__(self, cfg: PacsConfig) -> None:
        self.cfg = cfg
        self.client = DICOMwebClient(cfg.dicomweb_url.rstrip("/"), session=session(cfg))
        self.client.set_http_retry_params(retry=False)

    def _call(self, what: str, call):
        def once():
            try:
                return call()
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status in TRY_LATER:
                    raise _TryLater(f"HTTP {status}") from exc
                raise PacsError(f"PACS {self.cfg.name} refused {what}: HTTP {status}") from exc

        return with_retries(what, once, self.cfg, TRANSIENT)

    def search(self, since: str) -> list[SeriesRef]:
        """QIDO-RS series search per modality, studies dated ``since`` or later."""
        found: dict[str, SeriesRef] = {}
        for modality in self.cfg.modalities:
            filters = {"Modality": modality, "StudyDate": f"{since}-"}
            if self.cfg.series_description:
                filters["SeriesDescription"] = self.cfg.series_description
            rows = self._call(
                "QIDO-RS series search",
                lambda f=filters: self.client.search_for_series(
                    search_filters=f, fields=SERIES_FIELDS, get_remaining=True
                ),
            )
            for row in rows:
                ref = _ref(Dataset.from_json(row), modality)
                found[ref.series_uid] = ref
        return sorted(found.values(), key=lambda r: (r.study_date, r.study_uid, r.series_uid))

    def count(self, ref: SeriesRef) -> int | None:
        """How many instances the PACS lists for ``ref`` now (QIDO-RS on its UID)."""
        rows = self._call(
            "QIDO-RS series search",
            lambda: self.client.search_for_series(
                search_filters={"SeriesInstanceUID": ref.series_uid},
                fields=["NumberOfSeriesRelatedInstances"],
            ),
        )
        return _ref(Dataset.from_json(rows[0]), ref.modality).n_instances if rows else None

    def retrieve(self, ref: SeriesRef, folder: Path) -> int:
        """WADO-RS retrieve of the whole series into ``folder``."""
        instances = self._call(
            "WADO-RS series retrieve",
            lambda: self.client.retrieve_series(ref.study_uid, ref.series_uid),
        )
        return write_instances(instances, folder)

    def store(self, datasets: Sequence[Dataset]) -> None:
        """STOW-RS; a failed instance in the answer is an error."""
        answer = self._call("STOW-RS store", lambda: self.client.store_instances(list(datasets)))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise PacsError(f"PACS {self.cfg.name} rejected {len(failed)} of {len(datasets)}")


def _ref(ds: Dataset, modality: str) -> SeriesRef:
    n = ds.get("NumberOfSeriesRelatedInstances")
    if not ds.get("StudyInstanceUID") or not ds.get("SeriesInstanceUID"):
        raise PacsError("QIDO-RS answer without Study/SeriesInstanceUID")
    return SeriesRef(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality") or modality),
        study_date=str(ds.get("StudyDate") or ""),
        n_instances=int(n) if n not in (None, "") else None,
    )
