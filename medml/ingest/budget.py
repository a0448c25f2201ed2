"""Memory budgets: what a header claims is checked before anything is allocated for it.

A 1 KB file can claim 65535 x 65535 pixels and a 2 MB gzip stream can inflate to gigabytes, so
every reader compares the claim with the file's size (uncompressed data can hold no more than
the file) and with the ceiling ``ingest.max_voxels`` (compressed data can claim anything), and
inflates gzip and deflate streams with an output cap, in chunks, stopping past it. A refusal is
a :class:`BudgetError` whose message names what was claimed (it becomes the quarantine reason).

The claim checks are hand-written: nibabel and pydicom allocate what the header says, and
``zlib.decompress`` inflates without a limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from isal import isal_zlib

from medml.config import IngestConfig

# Default ceiling (IngestConfig.max_voxels): a 1024^3 volume, e.g. a 512 x 512 CT of 4096
# slices or a 1024^2 ultra-high-resolution CT of 1024 slices, beyond real CT/MR series.
MAX_VOXELS: int = IngestConfig.model_fields["max_voxels"].default
CHUNK = 1 << 20  # compressed bytes fed to the inflater at a time
GZIP_WBITS = 31  # gzip wrapper
DEFLATE_WBITS = -15  # raw deflate (DICOM Deflated Explicit VR Little Endian)


class BudgetError(ValueError):
    """A header or stream that claims more than the budget allows; the message says what."""


def size_text(n: int) -> str:
    """Bytes in a short human form (``2.0 GiB``)."""
    units = (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20),
             ("KiB", 2**10))  # fmt: skip
    for unit, scale in units:
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_claim(what: str, dims: Iterable[int], item_bytes: float, max_voxels: int) -> int:
    """The bytes ``dims`` of ``item_bytes`` each need; :class:`BudgetError` over ``max_voxels``.

    ``what`` names the claim in the reason (``"1024 x 1024 x 2048 uint8"``). Python integers,
    so a header claiming terabytes cannot overflow into a small number.
    """
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise BudgetError(f"header claims a negative size ({what})")
    voxels = math.prod(dims)
    nbytes = math.ceil(voxels * item_bytes)
    if voxels > max_voxels:
        raise BudgetError(
            f"too large: header claims {what} = {voxels} voxels ({size_text(nbytes)}), "
            f"over ingest.max_voxels={max_voxels}"
        )
    return nbytes


def check_held(what: str, needed: int, held: int) -> None:
    """Uncompressed data claiming more bytes than the file holds is truncated (or a bomb)."""
    if needed > held:
        raise BudgetError(
            f"truncated: header claims {what} ({size_text(needed)}), the file holds "
            f"{size_text(held)}"
        )


def _chunks(source: bytes | memoryview | BinaryIO) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i : i + CHUNK])
        return
    while chunk := source.read(CHUNK):
        yield chunk


class Inflater:
    """A gzip or raw deflate stream inflated on demand, never past what is asked for.

    :meth:`fill` inflates until the output holds ``limit`` bytes or the stream ends, so a
    reader can inflate a header, read the size it claims, and then inflate exactly that much
    (plus one byte, to see whether the stream holds more). Concatenated gzip members are read
    as one stream, as ``gzip`` does.
    """

    def __init__(self, source: bytes | memoryview | BinaryIO, wbits: int) -> None:
        self.wbits = wbits
        self._chunks = _chunks(source)
        self._inflater = isal_zlib.decompressobj(wbits)
        self._pending = b""
        self.parts: list[bytes] = []
        self.size = 0
        self.eof = False

    def fill(self, limit: int) -> int:
        """Inflate until ``limit`` output bytes or the end of the stream; the size reached."""
        while self.size < limit and not self.eof:
            if not self._pending:
                self._pending = next(self._chunks, b"")
                if not self._pending:  # input ended: output held back inside, if any
                    out = self._inflater.decompress(b"", limit - self.size)
                    if not out:
                        self.eof = True
                        break
                    self.parts.append(out)
                    self.size += len(out)
                    continue
            out = self._inflater.decompress(self._pending, limit - self.size)
            self._pending = self._inflater.unconsumed_tail
            if self._inflater.eof:
                rest = self._inflater.unused_data + self._pending
                if self.wbits != GZIP_WBITS or not rest.strip(b"\x00"):
                    self.eof, self._pending = True, b""
                else:  # another gzip member
                    self._inflater, self._pending = isal_zlib.decompressobj(self.wbits), rest
            if out:
                self.parts.append(out)
                self.size += len(out)
        return self.size

    def data(self, writable: bool = False) -> bytes | bytearray:
        """Everything inflated so far, as one bytes object (``writable``: a bytearray, so
        arrays viewing it can be written, as the arrays nibabel reads can)."""
        if len(self.parts) != 1 or (writable and not isinstance(self.parts[0], bytearray)):
            self.parts = [(bytearray() if writable else b"").join(self.parts)]
        return self.parts[0]

    def read_exactly(self, what: str, needed: int, writable: bool = False) -> bytes | bytearray:
        """The whole stream, which must inflate to ``needed`` bytes: no more (a bomb, or data
        the header does not describe), no less (truncated)."""
        self.fill(needed + 1)
        if self.size > needed:
            raise BudgetError(
                f"compressed stream inflates past the {needed} bytes its header claims "
                f"({what}, {size_text(needed)}); inflation stopped there"
            )
        if self.size < needed:
            raise BudgetError(
                f"truncated: header claims {what} ({size_text(needed)}), the compressed "
                f"stream inflates to {size_text(self.size)}"
            )
        return self.data(writable)
