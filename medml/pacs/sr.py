"""One DICOM Comprehensive SR per predicted series (highdicom, TID 1500 Measurement Report).

Each scan of the series is one measurement group (TID 1501) referencing every source instance:
the predicted class as its coded finding (the template's "Finding" row), the open-set
"unknown" flag as a yes/no evaluation, the class probabilities, the similarity and the margin
as measurements, and the model as the algorithm (name and registry version). Class codes use
the private scheme ``99MEDML`` (the model's class names: no standard code exists for a user's
own classes).

The SR is filed with the study it reports on, so it copies the patient and study modules from
the source headers: :func:`build_sr` runs on headers read for this run only, and the dataset it
returns is sent and dropped, never written to the workspace. Its UIDs derive from the series
key and model version, so a send repeated after a crash replaces the same instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

SCHEME = "99MEDML"
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
UNKNOWN = hd.sr.CodedConcept("unknown", SCHEME, "Outside the known classes (open set)")
SIMILARITY = hd.sr.CodedConcept("similarity", SCHEME, "Cosine similarity to the prototype")
MARGIN = hd.sr.CodedConcept("margin", SCHEME, "Similarity margin over the runner-up")
YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
NO = hd.sr.CodedConcept("373067005", "SCT", "No")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
SERIES_NUMBER = 9900  # high, so the viewer lists the report after the images
PROB = "prob_"


def class_code(name: str) -> hd.sr.CodedConcept:
    """The coded finding of a model class."""
    return hd.sr.CodedConcept(name, SCHEME, name)


def sr_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (stable across runs, so a resend replaces the instance)."""
    return generate_uid(entropy_srcs=["medml-sr", *parts])


def _group(
    row: dict[str, Any], evidence: Sequence[Dataset], model: str, version: str, key: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(name=model, version=str(version))
    probs = {k.removeprefix(PROB): v for k, v in row.items() if k.startswith(PROB)}
    measurements = [
        hd.sr.Measurement(
            name=hd.sr.CodedConcept(f"p-{c}", SCHEME, f"Probability of {c}"),
            value=float(p),
            unit=NO_UNITS,
            algorithm_id=algorithm,
        )
        for c, p in sorted(probs.items())
        if p is not None
    ]
    for name, column in ((SIMILARITY, "similarity"), (MARGIN, "margin")):
        if row.get(column) is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=name, value=float(row[column]), unit=NO_UNITS, algorithm_id=algorithm
                )
            )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=sr_uid(key, model, str(version), str(row["scan_id"])),
            identifier=f"medml scan {row['scan_id']}",
        ),
        finding_type=class_code(str(row["predicted_class"])),  # TID 1501 "Finding" (121071)
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(UNKNOWN, YES if row.get("unknown") else NO)
        ],
        measurements=measurements,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            for ds in evidence
        ],
    )


def build_sr(
    evidence: Sequence[Dataset],
    rows: Sequence[dict[str, Any]],
    model: str,
    version: str,
    series_key: str,
) -> hd.sr.ComprehensiveSR:
    """The SR reporting ``rows`` (one prediction per scan of the series) on ``evidence`` (the
    series' instance headers, in memory)."""
    if not evidence:
        raise ValueError(f"series {series_key}: no source instances to reference")
    if not rows:
        raise ValueError(f"series {series_key}: no prediction to report")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=sr_uid("device", model), name="medml", manufacturer_name="medml", model_name=model
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[_group(r, evidence, model, version, series_key) for r in rows],
    )
    return hd.sr.ComprehensiveSR(
        evidence=list(evidence),
        content=report[0],
        series_instance_uid=sr_uid(series_key, model, str(version), "series"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sr_uid(series_key, model, str(version), "instance"),
        instance_number=1,
        manufacturer="medml",
        is_complete=True,
        series_description=f"medml {model} v{version}"[:64],
    )


def read_sr(ds: Dataset) -> dict[str, Any]:
    """What an SR written by :func:`build_sr` says (for checks and tests): per measurement
    group the finding, the unknown flag, the measurements and the referenced instances."""
    sr = hd.sr.ComprehensiveSR.from_dataset(ds)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = []
    for group in report.get_image_measurement_groups():
        evaluations = {e.name.meaning: e.value for e in group.get_qualitative_evaluations()}
        groups.append(
            {
                "tracking": group.tracking_identifier,
                "finding": group.finding_type.value if group.finding_type else None,
                "unknown": evaluations[UNKNOWN.meaning] == YES,
                "measurements": {m.name.value: m.value for m in group.get_measurements()},
                "instances": {str(s.referenced_sop_instance_uid) for s in group.source_images},
            }
        )
    evidence_series = {str(s[1]) for s in sr.get_evidence_series()}
    return {"groups": groups, "series": evidence_series, "study": str(sr.StudyInstanceUID)}
