"""Which volumes a group of image planes holds, and a last check of each before it is written.

A group is the planes of one SeriesInstanceUID with one orientation and matrix. Its planes may
hold one volume (every position once), several (a 4D series: time points, echoes, b-values,
several stacks of one enhanced object, the files of a mosaic time series), or a structure that
cannot be resolved with certainty; the last is an :class:`Unresolved` error whose message names
what was found, and becomes a quarantine, never a volume.

Volumes are told apart as dcm2niix does (nii_dicom_batch.cpp): first by container (enhanced
frames by their DimensionIndexValues without the in-stack position; each mosaic file), then
by the first header key, or pair of keys, that partitions the planes into equal complete stacks
(file, echo number, temporal position, Philips private phase / gradient numbers, trigger time,
b-value and gradient direction, acquisition number, echo time), and as a last resort by a
regular repeat of the positions in instance order (every volume the same positions in the same
order; only where every plane has its own InstanceNumber).

:func:`verify_stack` is the invariant every output volume must satisfy, however it was grouped:
one series, one orientation, one matrix, one set of frame keys, one plane per position, evenly
spaced along one line. A grouping bug then turns into a quarantine, not into data.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Protocol

import numpy as np

POSITION_DECIMALS = 3  # positions equal to 1 um are the same position


class Plane(Protocol):
    """What this module reads from a slice (medml.ingest.dicom.Slice)."""

    position: np.ndarray
    orientation: np.ndarray

    def key_value(self, name: str) -> Any: ...

    @property
    def instance_key(self) -> Hashable: ...

    @property
    def container(self) -> Hashable | None: ...

    @property
    def matrix(self) -> tuple[int, int]: ...

    @property
    def instance_number(self) -> int: ...

    frame: int | None
    tile: int | None


class Unresolved(ValueError):
    """The planes do not partition into volumes with certainty; the message says what was found."""


def _diffusion(s: Plane) -> Hashable:
    """b-value and gradient direction (standard tags, else the vendors' private ones)."""
    b = s.key_value("DiffusionBValue")
    g = s.key_value("DiffusionGradientOrientation")
    if b is None and g is None:
        return None
    return (b, g)


# Keys that tell the volumes of a classic 4D series apart, tried in this order.
KEYS: dict[str, Callable[[Plane], Hashable]] = {
    "File": lambda s: s.key_value("SOPInstanceUID"),  # each enhanced file one volume
    "EchoNumbers": lambda s: s.key_value("EchoNumbers"),
    "TemporalPositionIdentifier": lambda s: s.key_value("TemporalPositionIdentifier"),
    "TemporalPositionIndex": lambda s: s.key_value("TemporalPositionIndex"),
    "PhilipsPhaseNumber": lambda s: s.key_value("PhilipsPhaseNumber"),
    "PhilipsGradientNumber": lambda s: s.key_value("PhilipsGradientNumber"),
    "TriggerTime": lambda s: s.key_value("TriggerTime"),
    "Diffusion": _diffusion,
    "AcquisitionNumber": lambda s: s.key_value("AcquisitionNumber"),
    "EchoTime": lambda s: s.key_value("EchoTime"),
}
INSTANCE_ORDER = "instance order"
CONTAINER = "container"


@dataclass
class Volume:
    """The planes of one output volume and what tells it apart from its series' others."""

    planes: list
    split_by: str | None = None  # None: the group held one volume
    label: str | None = None  # suffix that makes the series uid unique, e.g. "EchoNumbers=2"
    keys: dict[str, Hashable] = field(default_factory=dict)  # key -> the value all planes share


def normal_of(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / max(float(np.linalg.norm(normal)), 1e-12)


def _along(planes: Sequence[Plane], normal: np.ndarray) -> list[float]:
    return [round(float(p.position @ normal), POSITION_DECIMALS) for p in planes]


def _sort_value(value: Hashable) -> tuple:
    """Numeric order where the values are numbers, text order otherwise (None first)."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, tuple):
        return (1, 0.0, str([_sort_value(v) for v in value]))
    try:
        return (1, float(value), "")
    except (TypeError, ValueError):
        return (2, 0.0, str(value))


def split_volumes(members: list[Plane]) -> list[Volume]:
    """The volumes in ``members``; raises :class:`Unresolved` where that is not certain.

    Planes whose positions repeat without any key separating them, in fewer than half of
    the positions, stay one group: they are duplicates (copies or conflicts), which the
    series checks handle.
    """
    normal = normal_of(members[0].orientation)
    by_container: dict[Hashable, list[Plane]] = defaultdict(list)
    for p in members:
        by_container[p.container].append(p)
    if len(by_container) == 1:
        return _split_group(members, normal)
    out = []
    for container, group in sorted(by_container.items(), key=lambda kv: str(kv[0])):
        # named by the container itself, so adding or removing files renames no other volume
        name = _container_name(container)
        for vol in _split_group(group, normal):
            vol.split_by = CONTAINER if vol.split_by is None else f"{CONTAINER}+{vol.split_by}"
            vol.label = name if vol.label is None else f"{name}/{vol.label}"
            vol.keys[CONTAINER] = container
            out.append(vol)
    return out


def _container_name(container: Hashable | None) -> str:
    """``plain``, ``dims=1.2.0`` (an enhanced dimension index) or a mosaic's SOPInstanceUID."""
    if not isinstance(container, tuple):
        return "plain"
    kind, value = container[0], container[1]
    if kind == "frames":
        return "dims=" + (".".join(map(str, value)) if value is not None else "none")
    return str(value)


def _split_group(members: list[Plane], normal: np.ndarray) -> list[Volume]:
    # copies of one instance (same SOPInstanceUID, frame, tile) count once; they follow it
    copies: dict[Hashable, list[Plane]] = defaultdict(list)
    for p in members:
        copies[p.instance_key].append(p)
    unique = [group[0] for group in copies.values()]
    pos = dict(zip(map(id, unique), _along(unique, normal)))
    counts = Counter(pos.values())
    if max(counts.values()) == 1:
        return [Volume(members)]
    all_positions = sorted(counts)

    def complete(groups: dict[Hashable, list[Plane]]) -> bool:
        return len(groups) > 1 and all(
            sorted(pos[id(p)] for p in g) == all_positions for g in groups.values()
        )

    def expand(group: list[Plane]) -> list[Plane]:
        return [c for p in group for c in copies[p.instance_key]]

    names = list(KEYS)
    values = {k: [KEYS[k](p) for p in unique] for k in names}  # once, not once per combination
    for combo in [(k,) for k in names] + list(combinations(names, 2)):
        groups: dict[Hashable, list[Plane]] = defaultdict(list)
        for p, value in zip(unique, zip(*(values[k] for k in combo))):
            groups[value].append(p)
        if complete(groups):
            label = "+".join(combo)
            return [
                Volume(
                    expand(g),
                    label,
                    "_".join(f"{k}={v}" for k, v in zip(combo, value)),
                    dict(zip(combo, value)),
                )
                for value, g in sorted(groups.items(), key=lambda kv: _sort_value(kv[0]))
            ]
    ordered = sorted(unique, key=lambda p: (p.instance_number, p.frame or 0, p.tile or 0))
    n_pos = len(all_positions)
    enhanced = members[0].container is not None and members[0].container[0] == "frames"
    if enhanced:  # frame order is no evidence: the dimension index must separate the stacks
        raise Unresolved(
            f"enhanced object: {len(unique)} frames at {n_pos} positions that its "
            "DimensionIndexSequence does not separate into stacks"
        )
    numbers = [p.instance_number for p in ordered]
    numbered = all(numbers) and len(set(numbers)) == len(numbers)  # file order is no evidence
    if numbered and len(ordered) % n_pos == 0:
        chunks = {i: ordered[i * n_pos : (i + 1) * n_pos] for i in range(len(ordered) // n_pos)}
        # a regular repeat: every volume holds every position once, in the same order
        orders = {tuple(pos[id(p)] for p in g) for g in chunks.values()}
        if complete(chunks) and len(orders) == 1:
            return [Volume(expand(g), INSTANCE_ORDER, f"vol{i + 1}", {}) for i, g in chunks.items()]
    repeated = sum(1 for c in counts.values() if c > 1)
    if 2 * repeated < n_pos:
        return [Volume(members)]
    raise Unresolved(describe_unresolved(ordered, pos))


def describe_unresolved(ordered: list[Plane], pos: dict[int, float]) -> str:
    """What a 4D group that would not split looks like, read in instance order."""
    n_pos = len(set(pos.values()))
    volumes: list[set[float]] = [set()]
    for p in ordered:
        if pos[id(p)] in volumes[-1]:
            volumes.append(set())
        volumes[-1].add(pos[id(p)])
    sizes = [len(v) for v in volumes]
    incomplete = [i for i, n in enumerate(sizes) if n < n_pos]
    what = f"4D series: {n_pos} positions x {len(volumes)} volumes"
    if incomplete:
        i = incomplete[0]
        more = f" (and {len(incomplete) - 1} more)" if len(incomplete) > 1 else ""
        return (
            f"{what}, volume {i + 1} incomplete ({sizes[i]} of {n_pos} positions){more}; "
            "no header key separates the volumes"
        )
    counts = Counter(pos.values()).values()
    return (
        f"{what}: positions repeat {min(counts)} to {max(counts)} times and no header key "
        "separates the volumes"
    )


# ----------------------------------------------------------------------------- invariant


def verify_stack(
    vol: Volume, allow_gaps: bool = False, max_tilt_deg: float | None = 0.05
) -> str | None:
    """Why ``vol`` is not one acquired stack (None: it is). Independent of how it was grouped.

    Checks one orientation, one matrix, one plane per instance, the frame keys the split named,
    one plane per position, and positions on one line, evenly spaced (``allow_gaps`` where the
    missing-slice policy converts anyway), at most ``max_tilt_deg`` off the normal (None: any
    tilt, where the gantry-tilt policy converts anyway).
    """
    planes = vol.planes
    if not planes:
        return "internal check: empty volume"
    iop = planes[0].orientation
    if any(np.max(np.abs(p.orientation - iop)) > 1e-3 for p in planes):
        return "internal check: planes of different orientation in one volume"
    if len({p.matrix for p in planes}) != 1:
        return "internal check: planes of different matrix size in one volume"
    if len({p.instance_key for p in planes}) != len(planes):
        return "internal check: one instance twice in one volume"
    for name, want in vol.keys.items():
        get = (lambda p: p.container) if name == CONTAINER else KEYS[name]
        values = {get(p) for p in planes}
        if values != {want}:
            return f"internal check: planes of one volume differ in {name} ({len(values)} values)"
    if len(planes) < 2:
        return None
    normal = normal_of(iop)
    along = np.array(_along(planes, normal))
    order = np.argsort(along)
    along = along[order]
    gaps = np.diff(along)
    if np.any(gaps <= 0):
        return "internal check: two planes at one position in one volume"
    pts = np.array([planes[i].position for i in order], dtype=float)
    direction = pts[-1] - pts[0]
    length = float(np.linalg.norm(direction))
    t = (pts - pts[0]) @ direction / length**2  # 0..1 along the first-to-last line
    off_line = np.linalg.norm(pts - (pts[0] + t[:, None] * direction), axis=1)
    if float(off_line.max()) > 1e-2:
        return "internal check: slice positions are not on one line"
    if max_tilt_deg is not None:
        across = float(np.linalg.norm(np.cross(direction, normal)))
        tilt = float(np.degrees(np.arctan2(across, abs(float(direction @ normal)))))
        if tilt > max_tilt_deg + 1e-6:
            return f"internal check: slices {tilt:.2f} deg off their normal"
    if not allow_gaps:
        step = length / (len(planes) - 1)
        if float(np.max(np.abs(np.diff(t) * length - step))) > max(0.02, 5e-3 * step):
            return "internal check: slice positions are not evenly spaced"
    return None
