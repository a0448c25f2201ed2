"""Walking a source tree: every file once, symlinked folders listed but never entered."""

from __future__ import annotations

import os
from pathlib import Path


def walk(src: Path) -> tuple[list[Path], list[Path]]:
    """``(files, links_not_followed)``: regular files (and links to files) in sorted order;
    links to folders and broken links, which are listed but never entered or read."""
    found, links = [], []
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs.sort()
        for d in dirs:
            if (Path(root) / d).is_symlink():
                links.append(Path(root) / d)
        for f in sorted(files):
            p = Path(root) / f
            (found if p.is_file() else links).append(p)
    return found, sorted(links)


def walk_files(src: Path) -> list[Path]:
    """All files under ``src`` (symlinked folders are not entered, so loops cannot trap us)."""
    return walk(src)[0]
