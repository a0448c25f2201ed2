"""The first-party modules a step's code depends on, read from the sources' import statements.

A cache key that lists packages by hand drifts as the code moves; this walks the import graph
instead: from the module(s) of the library function a task calls, through every ``import`` and
``from ... import`` (module level and inside functions, relative or absolute), to every
``medml``/``flows`` module reached, with the ``__init__`` of each package on the way (importing
``a.b.c`` runs ``a`` and ``a.b`` first). Nothing is imported; the sources are parsed with ``ast``.

The standard library's ``modulefinder`` walks the same graph (the tests use it as the oracle),
but it compiles every file to bytecode: about 5x the time of this walk, which parses only the
import lines (:func:`import_nodes`; ``bench/code_graph.py``). The walk is
conservative: an import under ``if TYPE_CHECKING:`` or in a function that never runs still
counts, since a key that changes too often costs a re-run and one that changes too rarely
returns a stale result.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

FIRST_PARTY = ("medml", "flows")


class CodeGraph:
    """Import edges between first-party modules under ``root`` (the installed packages if None).

    Each source is parsed at most once per graph; :func:`graph` keeps one graph per root for the
    life of the process, like the modules Python itself has already imported.
    """

    def __init__(self, root: Path | None = None):
        self.root = root
        self._files: dict[str, Path | None] = {}
        self._edges: dict[str, frozenset[str]] = {}

    # ------------------------------------------------------------------ where modules live

    def _package_dir(self, top: str) -> Path | None:
        if self.root is not None:
            return self.root / top
        spec = importlib.util.find_spec(top)  # a top-level name: finds without importing
        locations = list(spec.submodule_search_locations or []) if spec else []
        return Path(locations[0]) if locations else None

    def file(self, module: str) -> Path | None:
        """The source file of a first-party module or package, or None where there is none."""
        if module not in self._files:
            top, *rest = module.split(".")
            base = self._package_dir(top) if top in FIRST_PARTY else None
            found = None
            if base is not None:
                stem = base.joinpath(*rest)
                candidates = [stem / "__init__.py"] + ([stem.with_suffix(".py")] if rest else [])
                found = next((c for c in candidates if c.is_file()), None)
            self._files[module] = found
        return self._files[module]

    def is_package(self, module: str) -> bool:
        path = self.file(module)
        return path is not None and path.name == "__init__.py"

    # ------------------------------------------------------------------------- the edges

    def imports(self, module: str) -> frozenset[str]:
        """First-party modules ``module``'s source imports, with their parent packages."""
        if module not in self._edges:
            path = self.file(module)
            nodes = import_nodes(path.read_text(encoding="utf-8"), str(path)) if path else []
            names = {name for node in nodes for name in self._imported_names(module, node)}
            self._edges[module] = frozenset(
                m for name in names if self.file(name) for m in self._with_parents(name)
            )
        return self._edges[module]

    def _imported_names(self, module: str, node: ast.stmt | str) -> Iterator[str]:
        if isinstance(node, str):  # importlib.import_module("...")
            yield node
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = module if self.is_package(module) else module.rpartition(".")[0]
            base = _resolve(node.module, node.level, package)
            if base is not None:
                yield base
                # ``from medml.fewshot import prototypes`` imports a submodule, not a name
                yield from (f"{base}.{a.name}" for a in node.names if a.name != "*")

    def _with_parents(self, module: str) -> list[str]:
        """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: what importing it runs (those with a file)."""
        parts = module.split(".")
        chain = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return [m for m in chain if self.file(m)]

    def closure(self, entries: Iterable[str]) -> list[str]:
        """Every first-party module that importing ``entries`` runs, sorted by name."""
        todo = []
        for entry in entries:
            if self.file(entry) is None:
                where = self.root or "the installed packages"
                raise ModuleNotFoundError(f"no first-party module {entry!r} under {where}")
            todo += self._with_parents(entry)
        seen: set[str] = set()
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += self.imports(module) - seen
        return sorted(seen)

    def fingerprint(self, entries: Iterable[str]) -> str:
        """SHA-256 over the closure's files: each one's package-relative path, then its bytes."""
        h = hashlib.sha256()
        for module in self.closure(entries):
            path = self.file(module)
            assert path is not None  # the closure holds only modules with a file
            relative = module.replace(".", "/") + (
                "/__init__.py" if self.is_package(module) else ".py"
            )
            data = path.read_bytes()
            h.update(f"{relative}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()


def _resolve(name: str | None, level: int, package: str) -> str | None:
    """The absolute module of ``from <level dots><name> import ...`` inside ``package``."""
    if level == 0:
        return name
    parts = package.split(".") if package else []
    if level - 1 > len(parts) or (level - 1 == len(parts) and not name):
        return None  # beyond the top-level package: Python refuses it too
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


# A line that starts an import statement, and a literal ``import_module("...")`` anywhere.
_IMPORT_LINE = re.compile(r"^[ \t]*(?:from[ \t]+\.*[\w.]*[ \t]+import\b|import[ \t]+\w).*$", re.M)
_IMPORT_MODULE = re.compile(r"""\bimport_module\(\s*["']([\w.]+)["']""")


def import_nodes(source: str, filename: str = "<unknown>") -> list[ast.stmt | str]:
    """The import statements of ``source`` (at any depth), plus literal ``import_module`` names.

    Parsing only the lines that start an import is 10-20x faster than parsing the whole file
    (what keeps a cold fingerprint of the package in milliseconds); a statement that does not
    parse on its own (a docstring line that reads like an import, a bracket in a comment) sends
    the whole file through ``ast`` instead. The one form this misses is an import that does not
    begin its line (``x = 1; import y``, ``if c: import y``), which ``ruff format`` never leaves;
    a test compares this with a full parse on every file of the project.
    """
    nodes: list[ast.stmt | str] = list(_IMPORT_MODULE.findall(source))
    try:
        for statement in _import_statements(source):
            nodes += ast.parse(statement).body
    except SyntaxError:
        tree = ast.parse(source, filename=filename)  # a file Python itself could not import
        nodes = list(_IMPORT_MODULE.findall(source))
        nodes += [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    return nodes


def _import_statements(source: str) -> Iterator[str]:
    for match in _IMPORT_LINE.finditer(source):
        start, end = match.start(), match.end()
        if "(" in match.group(0) and ")" not in match.group(0):  # from x import (a,\n b)
            end = source.find(")", end) + 1 or len(source)
        while source[start:end].rstrip().endswith("\\"):  # a backslash continuation
            newline = source.find("\n", end + 1)
            end = len(source) if newline < 0 else newline
        yield source[start:end].strip()


@lru_cache(maxsize=8)
def graph(root: Path | None = None) -> CodeGraph:
    """The process-wide graph of ``root`` (None: wherever ``medml`` and ``flows`` import from)."""
    return CodeGraph(root)
