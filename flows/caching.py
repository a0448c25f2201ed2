"""Cache keys of the orchestration steps: inputs, config, code and data.

A step's key hashes four things (see docs/operations.md, "Caching"):

- **code**: the task's own source (Prefect's ``TASK_SOURCE``) and the source files of every
  first-party module the library call imports, found by walking the import graph from the
  call's module (``flows.code_graph``), so editing any file training imports re-trains and no
  hand-kept list can drift;
- **config**: only the sections the step reads, so a new ``predict.batch_size`` does not retrain;
- **data**: fingerprints of what the step reads that its arguments do not show: a source tree's
  file names, sizes and modification times, the catalog's scans, a model version's identity;
- **destination**: the workspace, catalog and MLflow URLs it writes to.

Prefect's own ``INPUTS`` policy would hash the whole ``Settings`` and miss the data, so each task
names its key parts with a small function of its parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from pydantic import BaseModel

from flows import code_graph
from medml.catalog import Catalog


def digest(*parts: Any) -> str:
    """Stable SHA-256 of JSON-able parts (pydantic models by their JSON dump)."""

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return str(value)

    blob = json.dumps(parts, sort_keys=True, default=plain).encode()
    return hashlib.sha256(blob).hexdigest()


@lru_cache(maxsize=64)
def code_fingerprint(*entry_modules: str, root: Path | None = None) -> str:
    """Hash of every first-party module that importing ``entry_modules`` runs.

    Each reached file counts by its package-relative path and bytes, in sorted order; ``root``
    is a folder holding ``medml/`` and ``flows/`` (default: wherever they import from). Cached
    per process, like the modules the process has imported.
    """
    return code_graph.graph(root).fingerprint(entry_modules)


def dependencies(*entry_modules: str, root: Path | None = None) -> list[str]:
    """The first-party modules (sorted names) whose source is in ``code_fingerprint``."""
    return code_graph.graph(root).closure(entry_modules)


def tree_fingerprint(path: str | Path) -> str:
    """Names, sizes and modification times of every file under ``path`` (or of one file).

    Like ``make``, this trusts mtimes instead of reading every byte of a large export; a missing
    path has its own fingerprint, so the step re-runs once it appears.
    """
    path = Path(path)
    if not path.exists():
        return digest("missing", str(path))
    if path.is_file():
        st = path.stat()
        return digest(str(path), st.st_size, st.st_mtime_ns)
    rows = []
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            try:
                st = p.stat()
            except OSError:  # vanished or a dangling link: still part of the picture
                rows.append((p.relative_to(path).as_posix(), -1, -1))
                continue
            rows.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return digest(str(path), rows)


def file_digest(path: str | Path | None) -> str | None:
    """SHA-256 of a small file's bytes (labels, support CSVs); None for no file."""
    if path is None:
        return None
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else tree_fingerprint(p)


def paths_fingerprint(paths: Iterable[str]) -> str:
    """Fingerprints of prediction inputs: NIfTI files and DICOM series folders."""
    return digest([tree_fingerprint(p) for p in paths])


def catalog_fingerprint(url: str, with_splits: bool, split: str | None = None) -> str:
    """The catalog's scans as a step reads them: ids, labels, volume hashes (and splits).

    Preprocessing assigns the splits itself, so its key leaves them out; training keys on them.
    """
    fields = ["scan_id", "label", "class_set", "content_hash", "volume"]
    if with_splits:
        fields.append("split")
    scans = Catalog(url).list_scans(split=split, labelled=False)
    return digest(url, [[s.get(f) for f in fields] for s in scans])


KeyParts = Callable[[dict[str, Any]], Any]


@dataclass(kw_only=True)  # after the base's own fields, which have defaults
class LibraryCodePolicy(CacheKeyFnPolicy):
    """Key = the code of ``entry_modules``' import closure + ``key_parts(task parameters)``.

    A key function policy that keeps its entry modules in sight (docs and tests read them).
    """

    key_parts: KeyParts
    entry_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        self.cache_key_fn = self.key

    def key(self, _ctx: Any, params: dict[str, Any]) -> str:
        return digest(code_fingerprint(*self.entry_modules), self.key_parts(params))


def step_cache(key_parts: KeyParts, *entry_modules: str) -> CachePolicy:
    """Prefect cache policy: the task's source + the code its library call imports + its data.

    ``entry_modules`` name the module(s) of the function(s) the task calls (``"medml.train"``);
    what they import is found, not listed.
    """
    if not entry_modules:
        raise ValueError("step_cache needs the module of the library function the task calls")
    for module in entry_modules:  # a typo fails when the flows load, not at the first run
        if code_graph.graph().file(module) is None:
            raise ModuleNotFoundError(f"step_cache: no first-party module {module!r}")
    return TASK_SOURCE + LibraryCodePolicy(key_parts=key_parts, entry_modules=tuple(entry_modules))
