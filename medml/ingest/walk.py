"""Walking a source tree: every file once, symlinked folders listed but never entered."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tree:
    """What a walk found, every entry in exactly one list."""

    files: list[Path] = field(default_factory=list)  # regular files and links to files
    links: list[Path] = field(default_factory=list)  # links to folders, broken links: not read
    special: list[Path] = field(default_factory=list)  # FIFOs, devices, sockets: never opened
    unreadable: list[Path] = field(default_factory=list)  # folders that could not be listed


def walk_tree(src: Path) -> Tree:
    """Walk ``src`` in sorted order without entering symlinked folders (loops cannot trap
    us) and without opening anything that is not a regular file (a FIFO would hang a read)."""
    tree = Tree()

    def unlistable(err: OSError) -> None:
        tree.unreadable.append(Path(err.filename))

    for root, dirs, files in os.walk(src, followlinks=False, onerror=unlistable):
        dirs.sort()
        for d in dirs:
            if (Path(root) / d).is_symlink():
                tree.links.append(Path(root) / d)
        for f in sorted(files):
            p = Path(root) / f
            if p.is_file():
                tree.files.append(p)
            elif p.is_symlink():
                tree.links.append(p)
            else:
                tree.special.append(p)
    tree.links.sort()
    return tree


def walk(src: Path) -> tuple[list[Path], list[Path]]:
    """``(files, not_read)``: regular files (and links to files) in sorted order; links to
    folders, broken links and special files, which are listed but never entered or read."""
    tree = walk_tree(src)
    return tree.files, sorted(tree.links + tree.special)


def walk_files(src: Path) -> list[Path]:
    """All files under ``src`` (symlinked folders are not entered, so loops cannot trap us)."""
    return walk_tree(src).files
