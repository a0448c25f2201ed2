"""Labels: a CSV keyed by series UID, path, study UID or patient ID (matched before hashing),
or one folder per class (the first folder under the source names the label)."""

from __future__ import annotations

import csv
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath

KEYS = ("series_uid", "path", "study_uid", "patient_id")
MAX_LABEL_CHARS = 64  # the catalog's label column


class LabelError(ValueError):
    """A label CSV that cannot be used as it is (names the file and line)."""


def _key_value(key: str, value: str | None) -> str:
    text = (value or "").strip()
    return text.strip("/") if key == "path" else text


def check_label(value: str | None, where: str) -> str:
    """``value`` stripped, if it is a usable label (empty: unlabelled): at most
    ``MAX_LABEL_CHARS`` characters, no control characters (a newline or tab would break the
    CSVs and reports it reaches)."""
    label = (value or "").strip()
    if len(label) > MAX_LABEL_CHARS:
        raise LabelError(f"{where}: label longer than {MAX_LABEL_CHARS} characters")
    bad = next((c for c in label if unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp"}), None)
    if bad is not None:
        raise LabelError(f"{where}: label contains the control character U+{ord(bad):04X}")
    return label


@dataclass
class LabelIndex:
    """Look up a label (and patient/study ids for NIfTI files) by the most specific key given."""

    by_key: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    folders: bool = False  # label = first path component under the source
    # fallback keys whose rows disagree (a patient whose studies have different labels):
    # never used, so a scan matching only such a key is unlabelled, not given one at random
    ambiguous: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def from_csv(cls, path) -> LabelIndex:
        index = cls({k: {} for k in KEYS})
        if path is None:
            return index
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            names = reader.fieldnames or []
            if "label" not in names:
                raise LabelError(f"{path}: label CSV needs a 'label' column")
            if not set(KEYS) & set(names):
                raise LabelError(f"{path}: label CSV needs one of the columns {', '.join(KEYS)}")
            seen: dict[tuple[str, str], tuple[int, str]] = {}  # (key, value) -> (line, label)
            line = reader.line_num
            for row in reader:
                label = check_label(row.get("label"), f"{path}, line {line + 1}")
                row["label"] = label
                keys = [(k, _key_value(k, row.get(k))) for k in KEYS if _key_value(k, row.get(k))]
                for rank, (key, value) in enumerate(keys):
                    first = seen.setdefault((key, value), (line + 1, label))
                    if first[1] == label:
                        index.by_key[key][value] = row
                    elif rank == 0:  # the row's own identity: two answers for one scan
                        raise LabelError(
                            f"{path}: lines {first[0]} and {line + 1} give the same {key} "
                            f"different labels ({first[1]!r} and {label!r}); keep one of them"
                        )
                    else:  # a fallback key (a patient's studies differ): never guess between
                        index.ambiguous.add((key, value))
                line = reader.line_num
        return index

    @classmethod
    def from_folders(cls) -> LabelIndex:
        """``SRC/<label>/...``: every file's first folder under the source is its class."""
        return cls({k: {} for k in KEYS}, folders=True)

    def _get(self, key: str, value: str) -> dict[str, str] | None:
        if (key, value) in self.ambiguous:
            return None
        return self.by_key.get(key, {}).get(value)

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
        if series_uid and (row := self._get("series_uid", series_uid)):
            return row
        if path:
            rel = PurePosixPath(path)
            for candidate in (rel, *rel.parents):
                text = candidate.as_posix()
                if text not in (".", "") and (row := self._get("path", text)):
                    return row
        if study_uid and (row := self._get("study_uid", study_uid)):
            return row
        if patient_id and (row := self._get("patient_id", patient_id)):
            return row
        if self.folders and path and len(PurePosixPath(path).parts) > 1:
            return {"label": PurePosixPath(path).parts[0]}
        return None
