"""``WS/plans.json``: written atomically, versioned, read back strictly."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from medml.io import atomic_write_text
from medml.planning.fingerprint import PlanningError
from medml.planning.rules import PLANS_VERSION, Plans
from medml.workspace import Workspace


def plans_path(ws: Workspace) -> Path:
    return ws.root / "plans.json"


def write_plans(ws: Workspace, plans: Plans) -> Path:
    """Write ``plans`` to ``WS/plans.json`` (temp file + rename); return the path."""
    path = plans_path(ws)
    atomic_write_text(path, plans.model_dump_json(indent=2) + "\n")
    return path


def read_plans(ws: Workspace) -> Plans | None:
    """The workspace's plans, or None when it has none. A file of another version or shape is
    an error that says to plan again, never a silent fallback to defaults."""
    path = plans_path(ws)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanningError(f"{path}: unreadable ({exc}); run `medml plan` again") from exc
    version = raw.get("version") if isinstance(raw, dict) else None
    if version != PLANS_VERSION:
        raise PlanningError(
            f"{path}: plans version {version!r}, this medml reads version {PLANS_VERSION}; "
            "run `medml plan` again"
        )
    try:
        return Plans.model_validate(raw)
    except ValidationError as exc:
        raise PlanningError(f"{path}: not valid plans ({exc}); run `medml plan` again") from exc
