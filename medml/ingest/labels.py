"""Label files: a CSV keyed by series UID, path, study UID or patient ID, matched before hashing."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

KEYS = ("series_uid", "path", "study_uid", "patient_id")


@dataclass
class LabelIndex:
    """Look up a label (and patient/study ids for NIfTI files) by the most specific key given."""

    by_key: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)

    @classmethod
    def from_csv(cls, path: Path | None) -> LabelIndex:
        index = cls({k: {} for k in KEYS})
        if path is None:
            return index
        with Path(path).open(newline="") as fh:
            reader = csv.DictReader(fh)
            if "label" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: label CSV needs a 'label' column")
            if not set(KEYS) & set(reader.fieldnames or []):
                raise ValueError(f"{path}: label CSV needs one of the columns {', '.join(KEYS)}")
            for row in reader:
                for key in KEYS:
                    value = (row.get(key) or "").strip()
                    if value:
                        index.by_key[key][value.rstrip("/") if key == "path" else value] = row
        return index

    def find(self, **ids: str | None) -> dict[str, str] | None:
        """The row for the first key (in :data:`KEYS` order) that matches."""
        for key in KEYS:
            value = ids.get(key)
            if value and value in self.by_key.get(key, {}):
                return self.by_key[key][value]
        return None
