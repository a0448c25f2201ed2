"""Cache keys' code part: derived from the import graph of the real sources, never listed."""

from __future__ import annotations

import ast
import inspect
import json
import modulefinder
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import Task

from flows import caching, code_graph, tasks

ROOT = Path(__file__).resolve().parents[1]


def cached_steps() -> dict[str, tuple[str, ...]]:
    """Task name -> the entry modules of its cache key, read from the tasks themselves."""
    steps = {}
    for task in vars(tasks).values():
        if isinstance(task, Task):
            policies = getattr(task.cache_policy, "policies", [task.cache_policy])
            for policy in policies:
                if isinstance(policy, caching.LibraryCodePolicy):
                    steps[task.name] = policy.entry_modules
    return steps


def defining_module(name: str) -> str:
    """The medml module that defines the top-level class or function ``name``.

    The tests look modules up by what they define, so they hold while modules move.
    """
    found = []
    for path in sorted((ROOT / "medml").rglob("*.py")):
        tree = ast.parse(path.read_bytes())
        defs = (ast.ClassDef, ast.FunctionDef)
        if any(isinstance(n, defs) and n.name == name for n in tree.body):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert len(found) == 1, f"{name} is defined in {found or 'no module'}"
    return found[0]


def test_every_cached_step_names_entry_modules_that_exist():
    steps = cached_steps()
    assert {"synthesize", "ingest", "preprocess", "train", "sweep", "prototypes"} <= set(steps)
    assert "predict-batch" in steps
    for name, entries in steps.items():
        assert entries, name
        assert caching.dependencies(*entries), name
    with pytest.raises(ModuleNotFoundError, match="medml.nope"):
        caching.step_cache(lambda p: [], "medml.nope")  # a typo fails when the flows load
    with pytest.raises(ValueError, match="module of the library function"):
        caching.step_cache(lambda p: [])


def test_closures_on_the_real_package_follow_what_the_steps_import():
    steps = cached_steps()
    deps = {name: set(caching.dependencies(*entries)) for name, entries in steps.items()}
    prototypes = defining_module("Prototypes")  # the module hand lists left out of training's
    assert prototypes in deps["train"]
    assert prototypes in deps["predict-batch"]
    assert defining_module("sort_and_check") in deps["predict-batch"]  # the DICOM series checks
    assert "medml.config" in deps["train"]
    # parent packages run on import, so they count
    assert {"medml", "medml.train"} <= deps["train"]
    # ... and what a step does not import does not
    assert not {m for m in deps["synthesize"] if m.startswith("medml.train")}
    assert not {m for m in deps["ingest"] if m.startswith("medml.train")}
    assert not any(m.startswith("flows") for m in deps["train"])
    assert "flows.runtime" in deps["ingest"]  # the task's own helper, named by the task


def test_closures_match_the_standard_library_modulefinder():
    """An independent walk (bytecode, every nested code object) finds the same modules."""
    for name, entries in cached_steps().items():
        finder = modulefinder.ModuleFinder(path=[str(ROOT)])
        for entry in entries:
            finder.import_hook(entry)
        first_party = {m for m in finder.modules if m.split(".")[0] in code_graph.FIRST_PARTY}
        assert set(caching.dependencies(*entries)) == first_party, name


def test_import_lines_agree_with_a_full_parse_on_every_file():
    """The fast path (only import lines parsed) misses nothing a full ``ast`` walk finds."""
    for path in sorted(p for d in code_graph.FIRST_PARTY for p in (ROOT / d).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        full = {ast.dump(n) for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)}
        fast = {ast.dump(n) for n in code_graph.import_nodes(source) if isinstance(n, ast.AST)}
        assert fast == full, path


def test_each_task_body_imports_only_what_its_key_covers():
    """A task that starts calling another library module must name it (or reach it)."""
    for task in vars(tasks).values():
        if not isinstance(task, Task) or task.name not in cached_steps():
            continue
        covered = set(caching.dependencies(*cached_steps()[task.name]))
        body = code_graph.import_nodes(inspect.getsource(task.fn))
        for node in body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            first_party = [n for n in names if n.split(".")[0] in code_graph.FIRST_PARTY]
            assert set(first_party) <= covered, (task.name, first_party)


def test_walker_resolves_relative_nested_and_dynamic_imports(tmp_path):
    pkg = tmp_path / "medml"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "entry.py": (
            "from . import sibling\n"
            "from .sub import (\n    leaf,  # a submodule\n    NAME,\n)\n"
            "import numpy\n"
            "def late():\n    from medml.sub.deep import x\n"
            "    importlib.import_module('medml.plugin')\n"
        ),
        "sibling.py": "import os\nfrom .. import beyond_the_top\n",
        # a docstring line that reads like an import sends the file through a full parse
        "plugin.py": '"""Docs that say\nimport the data first\n"""\ndef f():\n    import medml.aid',
        "aid.py": "",
        "unused.py": "",
        "sub/__init__.py": "NAME = 1\nif True:\n    from ..shared import y\n",
        "sub/leaf.py": "",
        "sub/deep.py": "x = 1\n",
        "shared.py": "y = 2\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = code_graph.CodeGraph(tmp_path)
    assert graph.closure(["medml.entry"]) == [
        "medml",
        "medml.aid",
        "medml.entry",
        "medml.plugin",
        "medml.shared",
        "medml.sibling",
        "medml.sub",
        "medml.sub.deep",
        "medml.sub.leaf",
    ]
    with pytest.raises(ModuleNotFoundError, match="medml.nope"):
        graph.closure(["medml.nope"])


def test_fingerprint_is_stable_per_entry_and_names_files_relative_to_the_package():
    entries = ["medml.cli", "flows.pipeline", "flows.serve"]
    installed = code_graph.CodeGraph().fingerprint(entries)  # cold: every file read again
    assert installed == code_graph.CodeGraph(ROOT).fingerprint(entries)
    ingest = caching.code_fingerprint("medml.ingest")
    assert ingest == caching.code_fingerprint("medml.ingest")
    assert ingest != caching.code_fingerprint("medml.train")
    assert caching.code_fingerprint("medml.train", "medml.ingest") != ingest


FINGERPRINTS = """
import json, sys
from flows import code_graph
steps = json.loads(sys.argv[1])
print(json.dumps({
    "medml": str(code_graph.graph().file("medml")),
    "keys": {name: code_graph.graph().fingerprint(entries) for name, entries in steps.items()},
}))
"""


def fingerprints_in(root: Path, steps: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Each step's code fingerprint computed by a fresh interpreter importing from ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", FINGERPRINTS, json.dumps(steps)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    assert Path(result["medml"]) == root / "medml" / "__init__.py"  # the copy, not the checkout
    return result["keys"]


@pytest.fixture()
def tree_copy(tmp_path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__")
    for package in code_graph.FIRST_PARTY:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    return tmp_path


def test_editing_a_module_changes_exactly_the_keys_of_the_steps_that_import_it(tree_copy):
    steps = cached_steps()
    deps = {name: set(caching.dependencies(*entries)) for name, entries in steps.items()}
    before = fingerprints_in(tree_copy, steps)
    # the same sources under another root give the same keys: files count by relative name
    assert before == {n: caching.code_fingerprint(*e) for n, e in steps.items()}
    assert before == {n: caching.code_fingerprint(*e, root=tree_copy) for n, e in steps.items()}

    edited = defining_module("Prototypes")
    path = tree_copy / (edited.replace(".", "/") + ".py")
    path.write_text(path.read_text() + "# edited\n")
    after = fingerprints_in(tree_copy, steps)

    changed = {name for name in steps if after[name] != before[name]}
    assert changed == {name for name in steps if edited in deps[name]}
    assert {"train", "sweep", "prototypes", "predict-batch"} <= changed
    assert not changed & {"synthesize", "ingest"}


def test_a_module_only_one_step_imports_changes_only_that_step(tree_copy):
    steps = cached_steps()
    deps = {name: set(caching.dependencies(*entries)) for name, entries in steps.items()}
    others = set().union(*(d for name, d in deps.items() if name != "synthesize"))
    only_synth = sorted(deps["synthesize"] - others)
    assert only_synth, "the synthesizer shares every module with another step"
    before = fingerprints_in(tree_copy, steps)
    module = only_synth[-1]
    path = code_graph.CodeGraph(tree_copy).file(module)
    path.write_text(path.read_text() + "\n# edited\n")
    after = fingerprints_in(tree_copy, steps)
    assert {name for name in steps if after[name] != before[name]} == {"synthesize"}
