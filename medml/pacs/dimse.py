"""DIMSE (pynetdicom): C-FIND search, C-GET or C-MOVE retrieve, C-STORE store.

C-GET receives the instances on the query association itself; C-MOVE asks the PACS to send
them to medml's own storage SCP (``pacs.calling_aet`` on ``pacs.listen_port``, which the PACS
must know as a modality), started for the duration of the retrieve.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from medml.pacs.config import PacsConfig
from medml.pacs.source import PacsError, SeriesRef, with_retries

# Image storage classes offered for C-GET/C-MOVE (each C-GET one needs an SCP role).
IMAGE_STORAGE = [
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    SecondaryCaptureImageStorage,
]
PENDING = (0xFF00, 0xFF01)


def no_delay(event: evt.Event) -> None:
    """Send each PDU at once (TCP_NODELAY): a DIMSE message is several small writes, which
    Nagle's algorithm would hold for the peer's delayed ACK (~40 ms per message)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NO_DELAY = (evt.EVT_CONN_OPEN, no_delay)


class NoAssociation(ConnectionError):
    """The PACS did not accept an association (down, refusing, or unknown AE title)."""


class InstanceWriter:
    """A C-STORE handler writing each received instance as a numbered file in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.n += 1
            name = self.folder / f"{self.n:06d}.dcm"
        try:
            ds.save_as(name, enforce_file_format=True)
        except OSError:
            return 0xA700  # out of resources: the sender knows this instance was not stored
        return 0x0000


class DimseSource:
    """A PACS over DIMSE."""

    def __init__(self, cfg: PacsConfig) -> None:
        self.cfg = cfg

    def _ae(self) -> AE:
        ae = AE(ae_title=self.cfg.calling_aet)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, attr, self.cfg.timeout_s)
        ae.connection_timeout = self.cfg.timeout_s
        return ae

    @contextmanager
    def _association(self, ae: AE, handlers: list | None = None, **kwargs) -> Iterator[Association]:
        assoc = ae.associate(
            self.cfg.host,
            self.cfg.port,
            ae_title=self.cfg.called_aet,
            evt_handlers=[NO_DELAY, *(handlers or [])],
            **kwargs,
        )
        if not assoc.is_established:
            raise NoAssociation(
                f"no association with {self.cfg.called_aet}@{self.cfg.host}:{self.cfg.port}"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _call(self, what: str, call):
        return with_retries(what, call, self.cfg, (NoAssociation, ConnectionError, TimeoutError))

    def search(self, since: str) -> list[SeriesRef]:
        """C-FIND at series level per modality, studies dated ``since`` or later."""
        found: dict[str, SeriesRef] = {}
        for modality in self.cfg.modalities:
            for ds in self._call("C-FIND", lambda m=modality: self._find(m, since)):
                n = ds.get("NumberOfSeriesRelatedInstances")
                ref = SeriesRef(
                    str(ds.StudyInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(ds.get("Modality") or modality),
                    str(ds.get("StudyDate") or ""),
                    int(n) if n not in (None, "") else None,
                )
                found[ref.series_uid] = ref
        return sorted(found.values(), key=lambda r: (r.study_date, r.study_uid, r.series_uid))

    def _find(self, modality: str, since: str, series_uid: str = "") -> list[Dataset]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyDate = f"{since}-" if since else ""
        query.Modality = modality
        query.SeriesDescription = self.cfg.series_description or ""
        for key in ("StudyInstanceUID", "NumberOfSeriesRelatedInstances"):
            setattr(query, key, "")
        query.SeriesInstanceUID = series_uid
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        answers = []
        with self._association(ae) as assoc:
            for status, ident in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                if not status:
                    raise ConnectionError(
                        f"C-FIND: no answer (aborted or timed out; does the PACS know "
                        f"{self.cfg.calling_aet} as a modality?)"
                    )
                if status.Status in PENDING and ident is not None:
                    answers.append(ident)
                elif status.Status != 0x0000:
                    raise PacsError(f"C-FIND refused: status 0x{status.Status:04X}")
        return answers

    def count(self, ref: SeriesRef) -> int | None:
        """How many instances the PACS lists for ``ref`` now (C-FIND on its UID)."""
        found = self._call("C-FIND", lambda: self._find("", "", ref.series_uid))
        n = found[0].get("NumberOfSeriesRelatedInstances") if found else None
        return int(n) if n not in (None, "") else None

    def retrieve(self, ref: SeriesRef, folder: Path) -> int:
        """C-GET (or C-MOVE to our own SCP) of the whole series into ``folder``."""
        move = self.cfg.retrieve == "move"
        what = "C-MOVE" if move else "C-GET"

        def attempt() -> int:
            for stale in folder.iterdir():  # a retried attempt starts from nothing
                stale.unlink()
            writer = InstanceWriter(folder)
            (self._move if move else self._get)(ref, writer)
            return writer.n

        return self._call(what, attempt)

    def _identifier(self, ref: SeriesRef) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = ref.study_uid
        ds.SeriesInstanceUID = ref.series_uid
        return ds

    def _get(self, ref: SeriesRef, writer: InstanceWriter) -> None:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop in IMAGE_STORAGE:
            ae.add_requested_context(sop)
        roles = [build_role(sop, scp_role=True) for sop in IMAGE_STORAGE]
        handlers = [(evt.EVT_C_STORE, writer)]
        with self._association(ae, handlers, ext_neg=roles) as assoc:
            model = StudyRootQueryRetrieveInformationModelGet
            _check_retrieve("C-GET", assoc.send_c_get(self._identifier(ref), model))

    def _move(self, ref: SeriesRef, writer: InstanceWriter) -> None:
        scp = self._ae()
        for sop in IMAGE_STORAGE:
            scp.add_supported_context(sop)
        server = scp.start_server(
            (self.cfg.listen_host, self.cfg.listen_port),
            block=False,
            evt_handlers=[NO_DELAY, (evt.EVT_C_STORE, writer)],
        )
        try:
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self._association(ae) as assoc:
                model = StudyRootQueryRetrieveInformationModelMove
                answers = assoc.send_c_move(self._identifier(ref), self.cfg.calling_aet, model)
                _check_retrieve("C-MOVE", answers)
        finally:
            server.shutdown()

    def store(self, datasets: Sequence[Dataset]) -> None:
        """C-STORE each dataset; any non-success status is an error."""

        def send() -> None:
            ae = self._ae()
            for sop in {str(ds.SOPClassUID) for ds in datasets} | {ComprehensiveSRStorage}:
                ae.add_requested_context(sop)
            with self._association(ae) as assoc:
                for ds in datasets:
                    status = assoc.send_c_store(ds)
                    if not status:
                        raise ConnectionError("C-STORE: no answer")
                    if status.Status != 0x0000:
                        raise PacsError(f"C-STORE refused: status 0x{status.Status:04X}")

        self._call("C-STORE", send)


def _check_retrieve(what: str, answers) -> None:
    """Consume C-GET/C-MOVE answers; raise unless the final status is success, no failures."""
    final = None
    for status, _ in answers:
        if not status:
            raise ConnectionError(f"{what}: no answer (association aborted or timed out)")
        final = status
    if final is None:
        raise ConnectionError(f"{what}: no answer")
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    if final.Status != 0x0000 or failed:
        raise PacsError(f"{what} ended with status 0x{final.Status:04X}, {failed} failed")
