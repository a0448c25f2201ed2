"""Fake but realistic patient identities, so that de-identification has something to strip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GIVEN = (
    "Maria",
    "James",
    "Aiko",
    "Olusegun",
    "Ingrid",
    "Rahul",
    "Fatima",
    "Lucas",
    "Mei",
    "Tomasz",
    "Elena",
    "Kwame",
    "Sofia",
    "Hiroshi",
    "Amara",
    "Jonas",
    "Leila",
    "Mateo",
    "Anya",
    "Samir",
)
FAMILY = (
    "Okafor",
    "Lindqvist",
    "Tanaka",
    "Moreau",
    "Kowalski",
    "Haddad",
    "Fernandes",
    "Novak",
    "Schneider",
    "Nakamura",
    "Osei",
    "Petrov",
    "Gallagher",
    "Rossi",
    "Iyer",
    "Brennan",
)
INSTITUTIONS = (
    "St. Aurelia General Hospital",
    "Northbridge University Clinic",
    "Riverside Medical Centre",
    "Lakeview Regional Hospital",
)


@dataclass(frozen=True)
class Identity:
    """What a hospital export carries about a patient: every field here must be stripped."""

    name: str
    patient_id: str
    birth_date: str
    sex: str
    institution: str

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Identity:
        return cls(
            name=f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
            patient_id=f"MRN{rng.integers(10**6, 10**7)}",
            birth_date=(
                f"{rng.integers(1935, 2005)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
            ),
            sex=str(rng.choice(["F", "M"])),
            institution=str(rng.choice(INSTITUTIONS)),
        )

    def accession(self, study_index: int) -> str:
        return f"ACC{self.patient_id[3:]}{study_index:02d}"
