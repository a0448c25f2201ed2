"""Prediction files: CSV safe to open in a spreadsheet, Parquet with the raw values.

CSV: a text cell or column header that starts with ``= + - @``, a tab or a carriage return is
prefixed with ``'``, as OWASP recommends against formula injection (a class named
``=HYPERLINK(...)`` must not become a live formula); numbers are rounded to
:data:`CSV_DECIMALS` decimals. Parquet keeps the raw text and full precision. Every file is
written atomically and gets the same mode as any file this process creates (the umask), not
``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from medml.io import atomic_path

CSV_DECIMALS = 4  # probabilities and cosine similarities: 0.4970 vs 0.5012 still reads apart
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: object) -> object:
    """``value`` escaped for a spreadsheet when it is text starting like a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with formula-like text cells and headers escaped and floats rounded."""
    out = frame.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].round(CSV_DECIMALS)
        elif pd.api.types.is_object_dtype(out[col]) or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(csv_text)
    out.columns = [csv_text(str(c)) for c in out.columns]
    return out


def umask_mode(path: Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


class TableWriter:
    """Append batches of rows to a CSV and/or a Parquet file; both renamed into place when the
    enclosing ``ExitStack`` closes without an error."""

    def __init__(self, stack: contextlib.ExitStack, paths: dict[str, Path], schema: pa.Schema):
        self.tmp = {
            fmt: stack.enter_context(atomic_path(p, suffix=p.suffix)) for fmt, p in paths.items()
        }
        for tmp in self.tmp.values():
            umask_mode(tmp)
        self.schema = schema
        self.header = True
        self.parquet: pq.ParquetWriter | None = None
        if "parquet" in self.tmp:
            self.parquet = stack.enter_context(pq.ParquetWriter(self.tmp["parquet"], schema))
        if "csv" in self.tmp:
            self.tmp["csv"].write_text("")

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def write(self, frame: pd.DataFrame) -> None:
        frame = frame.reindex(columns=self.columns)
        if "csv" in self.tmp:
            csv_safe(frame).to_csv(self.tmp["csv"], mode="a", header=self.header, index=False)
        if self.parquet is not None:
            clean = frame.astype(object).where(frame.notna(), None)
            self.parquet.write_table(pa.Table.from_pandas(clean, self.schema, preserve_index=False))
        self.header = False

    def finish(self) -> None:
        """An empty table still gets its header (and Parquet schema)."""
        if self.header:
            self.write(pd.DataFrame(columns=self.columns))


def write_table(frame: pd.DataFrame, paths: dict[str, Path], schema: pa.Schema) -> None:
    """Write ``frame`` at once to each of ``paths`` (format -> path)."""
    with contextlib.ExitStack() as stack:
        writer = TableWriter(stack, paths, schema)
        writer.write(frame)
