"""Cache keys of the orchestration steps: inputs, config, code and data.

A step's key hashes four things (see docs/operations.md, "Caching"):

- **code**: the task's own source (Prefect's ``TASK_SOURCE``) and the source files of the
  library packages the step calls, so editing ``medml/train`` re-trains;
- **config**: only the sections the step reads, so a new ``predict.batch_size`` does not retrain;
- **data**: fingerprints of what the step reads that its arguments do not show: a source tree's
  file names, sizes and modification times, the catalog's scans, a model version's identity;
- **destination**: the workspace, catalog and MLflow URLs it writes to.

Prefect's own ``INPUTS`` policy would hash the whole ``Settings`` and miss the data, so each task
names its key parts with a small function of its parameters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from pydantic import BaseModel

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
def code_fingerprint(*modules: str) -> str:
    """Hash of the source files of the named modules or packages (sub-packages included)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(name)
        roots = list(spec.submodule_search_locations or [])
        files = (
            sorted(p for root in roots for p in Path(root).rglob("*.py"))
            if roots
            else [Path(spec.origin or "")]
        )
        for path in files:
            h.update(f"{name}:{path.name}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


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


def step_cache(key_parts: KeyParts, *modules: str) -> CachePolicy:
    """Prefect cache policy: task source + library code of ``modules`` + ``key_parts(params)``."""

    def key(_ctx: Any, params: dict[str, Any]) -> str:
        return digest(code_fingerprint(*modules), key_parts(params))

    return TASK_SOURCE + CachePolicy.from_cache_key_fn(key)
