"""What ingestion and prediction do with each case: one set of checks built from IngestConfig.

:class:`SeriesChecks` holds the thresholds and per-case policies of ``settings.ingest``;
:meth:`SeriesChecks.judge` gives the verdict on one series (convert, with warnings; skip; or
quarantine, with the reason). Ingestion and prediction (``medml.predict.loading``) both call
it, so a scan is accepted or refused the same way in training and in production.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medml.config import IngestConfig
from medml.ingest import budget, dicom, volumes

Action = Literal["convert", "skip", "quarantine"]
# cases no policy can convert: there is no volume to make of them
ALWAYS_QUARANTINE = {"unreadable", "no_pixels", "unsupported", "unresolved_4d", "too_large"}
NEVER_CONVERT = {"duplicate_position", "single_slice"}


@dataclass(frozen=True)
class Verdict:
    """What to do with one series: ``status`` is convert, skip or quarantine."""

    action: Action
    reason: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SeriesChecks:
    """Thresholds and policies for series and files (defaults: those of IngestConfig)."""

    min_slices: int = 2
    gap_factor: float = 1.5
    max_tilt_deg: float = 0.05
    on_4d: Literal["split", "quarantine"] = "split"
    policies: dict[str, Action] = field(default_factory=dict)  # case -> action
    max_voxels: int = budget.MAX_VOXELS  # what one file or series may claim

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> SeriesChecks:
        """The checks ``cfg`` asks for (``settings.ingest``)."""
        policies = {
            name[3:]: value
            for name, value in cfg.model_dump().items()
            if name.startswith("on_") and name != "on_4d"
        }
        if cfg.allow_burned_in:
            policies["burned_in"] = "convert"
        return cls(
            cfg.min_slices, cfg.gap_factor, cfg.max_tilt_deg, cfg.on_4d, policies, cfg.max_voxels
        )

    def action(self, case: str) -> Action:
        """The policy for one case (see IngestConfig); unknown cases are quarantined."""
        if case in ALWAYS_QUARANTINE:
            return "quarantine"
        return self.policies.get(case, "quarantine")

    def judge(self, series: dicom.Series) -> Verdict:
        """Sort ``series`` along its normal and decide; the last step is the stack invariant
        (:func:`medml.ingest.volumes.verify_stack`), so nothing unchecked is converted."""
        if series.problem:  # the planes did not resolve into volumes: never converted
            return Verdict("quarantine", series.problem.reason)
        too_large = dicom.series_budget_problem(series, self.max_voxels)
        if too_large:  # before sorting or decoding anything
            return Verdict("quarantine", too_large.reason)
        warnings = []
        if series.split_by:
            if self.on_4d == "quarantine":
                reason = f"4D series ({series.n_volumes} volumes, differing by {series.split_by})"
                return Verdict("quarantine", reason)
            warnings.append(f"4D series split by {series.split_by}")
        allowed = set()
        for problem in dicom.check_series(
            series, self.min_slices, self.gap_factor, self.max_tilt_deg
        ):
            action = self.action(problem.case)
            if action == "skip":
                return Verdict("skip", problem.reason)
            if action == "quarantine" or problem.case in NEVER_CONVERT:
                return Verdict("quarantine", problem.reason)
            allowed.add(problem.case)
            warnings.append(f"converted despite {problem.reason}")
        broken = volumes.verify_stack(
            series.stack(),
            allow_gaps="missing_slice" in allowed,
            max_tilt_deg=None if "gantry_tilt" in allowed else self.max_tilt_deg,
        )
        if broken:
            return Verdict("quarantine", broken)
        return Verdict("convert", warnings=warnings)
