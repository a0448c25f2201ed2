"""Labels: a CSV keyed by series UID, path, study UID or patient ID (matched before hashing),
or one folder per class (the first folder under the source names the label)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import PurePosixPath

KEYS = ("series_uid", "path", "study_uid", "patient_id")


@dataclass
class LabelIndex:
    """Look up a label (and patient/study ids for NIfTI files) by the most specific key given."""

    by_key: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    folders: bool = False  # label = first path component under the source

    @classmethod
    def from_csv(cls, path) -> LabelIndex:
        index = cls({k: {} for k in KEYS})
        if path is None:
            return index
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            names = reader.fieldnames or []
            if "label" not in names:
                raise ValueError(f"{path}: label CSV needs a 'label' column")
            if not set(KEYS) & set(names):
                raise ValueError(f"{path}: label CSV needs one of the columns {', '.join(KEYS)}")
            for row in reader:
                for key in KEYS:
                    value = (row.get(key) or "").strip()
                    if value:
                        index.by_key[key][value.strip("/") if key == "path" else value] = row
        return index

    @classmethod
    def from_folders(cls) -> LabelIndex:
        """``SRC/<label>/...``: every file's first folder under the source is its class."""
        return cls({k: {} for k in KEYS}, folders=True)

    def find(
        self,
        series_uid: str | None = None,
        path: str | None = None,
        study_uid: str | None = None,
        patient_id: str | None = None,
    ) -> dict[str, str] | None:
        """The row for the most specific key that matches.

        ``path`` (relative to the source, POSIX) matches a CSV path equal to the file itself or
        to any folder above it, the deepest first.
        """
        if series_uid and series_uid in self.by_key.get("series_uid", {}):
            return self.by_key["series_uid"][series_uid]
        if path:
            rel = PurePosixPath(path)
            paths = self.by_key.get("path", {})
            for candidate in (rel, *rel.parents):
                text = candidate.as_posix()
                if text not in (".", "") and text in paths:
                    return paths[text]
        if study_uid and study_uid in self.by_key.get("study_uid", {}):
            return self.by_key["study_uid"][study_uid]
        if patient_id and patient_id in self.by_key.get("patient_id", {}):
            return self.by_key["patient_id"][patient_id]
        if self.folders and path and len(PurePosixPath(path).parts) > 1:
            return {"label": PurePosixPath(path).parts[0]}
        return None
