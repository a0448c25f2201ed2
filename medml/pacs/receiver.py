"""``medml listen``: a C-STORE SCP (pynetdicom) that a PACS or a scanner pushes studies to.

Instances land in ``INBOX/.partial/<study key>-<random>/`` as numbered files. A study is
handed on (its folder renamed to ``INBOX/received-<time>-<n>/<study key>/`` and given to
``on_study``) once
no association that sent to it is open and it has been quiet for ``quiet_s``. Every instance
received is accounted for: stored, or refused with a failure status the sender sees (and
counted in the study's :class:`Receipt` or, without a study UID, in the receiver's totals).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from medml.ingest.deid import KeyMaker
from medml.pacs.dimse import NO_DELAY
from medml.pacs.inbox import PARTIAL

log = logging.getLogger(__name__)

CANNOT_UNDERSTAND = 0xC000  # no StudyInstanceUID: nothing to file it under
OUT_OF_RESOURCES = 0xA700


@dataclass
class Receipt:
    """What one study's pushes brought (keys and counts only)."""

    study_key: str
    folder: Path
    stored: int = 0
    failed: int = 0
    aborted: bool = False  # an association that sent to it ended in an abort
    first: float = field(default_factory=time.time)
    last: float = field(default_factory=time.monotonic)
    open: set[int] = field(default_factory=set)  # associations that sent to it, still open


class StoreReceiver:
    """A storage SCP filing instances per study and handing on complete, quiet studies."""

    def __init__(
        self,
        inbox: Path,
        keys: KeyMaker,
        on_study: Callable[[Receipt], None],
        ae_title: str = "MEDML",
        host: str = "0.0.0.0",
        port: int = 11112,
        quiet_s: float = 5.0,
    ) -> None:
        self.inbox, self.keys, self.on_study = inbox, keys, on_study
        self.ae_title, self.host, self.port, self.quiet_s = ae_title, host, port, quiet_s
        self.pending: dict[str, Receipt] = {}
        self.totals = {"received": 0, "stored": 0, "failed": 0, "studies": 0}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._watcher: threading.Thread | None = None

    # -- pynetdicom handlers (run in the association threads)

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.totals["received"] += 1
            study_uid = ds.get("StudyInstanceUID")
            if not study_uid:
                self.totals["failed"] += 1
                log.warning("refused an instance without StudyInstanceUID")
                return CANNOT_UNDERSTAND
            receipt = self._receipt(self.keys.key("study", str(study_uid)))
            receipt.open.add(id(event.assoc))
            receipt.last = time.monotonic()
            number = receipt.stored + receipt.failed + 1
        try:
            ds.save_as(receipt.folder / f"{number:06d}.dcm", enforce_file_format=True)
            ok = True
        except OSError as exc:
            log.warning("study %s: could not store an instance: %s", receipt.study_key, exc)
            ok = False
        with self.lock:
            receipt.stored += ok
            receipt.failed += not ok
            self.totals["stored" if ok else "failed"] += 1
            receipt.last = time.monotonic()
        return 0x0000 if ok else OUT_OF_RESOURCES

    def _receipt(self, key: str) -> Receipt:
        if key not in self.pending:
            staging = self.inbox / PARTIAL
            staging.mkdir(parents=True, exist_ok=True)
            self.pending[key] = Receipt(key, Path(tempfile.mkdtemp(prefix=f"{key}-", dir=staging)))
        return self.pending[key]

    def _on_close(self, event: evt.Event, aborted: bool = False) -> None:
        with self.lock:
            for receipt in self.pending.values():
                if id(event.assoc) in receipt.open:
                    receipt.open.discard(id(event.assoc))
                    receipt.aborted |= aborted
                    receipt.last = time.monotonic()

    # -- handing on

    def ready(self) -> list[Receipt]:
        """Studies whose associations all ended and that were quiet for ``quiet_s`` (removed
        from the pending ones and renamed into the inbox)."""
        now = time.monotonic()
        with self.lock:
            done = [r for r in self.pending.values() if not r.open and now - r.last >= self.quiet_s]
            for r in done:
                del self.pending[r.study_key]
        for r in done:
            r.folder = self._publish(r.folder, r.study_key)
        return done

    def _publish(self, folder: Path, key: str) -> Path:
        """Rename to ``INBOX/received-<time>-<n>/<key>/``: a folder ingestion can read alone."""
        prefix = time.strftime("received-%Y%m%dT%H%M%SZ-")
        final = Path(tempfile.mkdtemp(prefix=prefix, dir=self.inbox)) / key
        os.rename(folder, final)
        return final

    def leftovers(self) -> list[Receipt]:
        """What a receiver that stopped or was killed left: studies received but not handed on
        (their senders were told the instances were stored, so they are handed on now)."""
        found = []
        staging = self.inbox / PARTIAL
        for folder in sorted(staging.iterdir()) if staging.is_dir() else []:
            key = folder.name.rsplit("-", 1)[0]
            found.append(Receipt(key, self._publish(folder, key)))
        published = {r.folder for r in found}
        for folder in sorted(self.inbox.glob("received-*/*")):
            if folder not in published:
                found.append(Receipt(folder.name, folder))
        for r in found:
            r.stored = sum(1 for _ in r.folder.glob("*.dcm"))
        return found

    def _watch(self) -> None:
        waiting = self.leftovers()
        if waiting:
            log.info("%d studies left by an earlier receiver: handing them on", len(waiting))
        while not self._stop.wait(min(0.5, self.quiet_s / 4)):
            ready, waiting = waiting + self.ready(), []
            for receipt in ready:
                log.info(
                    "study %s: %d instances stored, %d failed%s",
                    receipt.study_key,
                    receipt.stored,
                    receipt.failed,
                    " (an association aborted)" if receipt.aborted else "",
                )
                try:
                    self.on_study(receipt)
                except Exception:  # the receiver keeps receiving; the study stays in the inbox
                    log.exception("handing on study %s failed", receipt.study_key)
                self.totals["studies"] += 1  # handed on (after on_study returned)

    def start(self) -> StoreReceiver:
        """Listen (in background threads) until :meth:`stop`."""
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        handlers = [
            NO_DELAY,
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_close),
            (evt.EVT_ABORTED, lambda e: self._on_close(e, aborted=True)),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        self._watcher = threading.Thread(target=self._watch, name="medml-listen", daemon=True)
        self._watcher.start()
        log.info("listening as %s on %s:%d", self.ae_title, self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop listening; studies still pending stay in ``INBOX/.partial``, handed on by the
        next receiver on this inbox when it starts (:meth:`leftovers`)."""
        if self._server is not None:
            self._server.shutdown()
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def __enter__(self) -> StoreReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
