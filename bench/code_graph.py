"""Benchmark: the cache keys' import walk vs the standard library's modulefinder (not a test).

Both start cold from the whole project (``medml.cli``, ``flows.pipeline``, ``flows.serve``) and
find the same first-party modules; the walk also reads and hashes every file it reaches. Prints
the median of ``--repeat`` cold runs of each and their ratio (goal: the walk well under 100 ms).

    .venv/bin/python bench/code_graph.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import modulefinder
import statistics
import time
from pathlib import Path

from flows.code_graph import FIRST_PARTY, CodeGraph

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ["medml.cli", "flows.pipeline", "flows.serve"]


def walk() -> set[str]:
    graph = CodeGraph(ROOT)
    graph.fingerprint(ENTRIES)
    return set(graph.closure(ENTRIES))


def find() -> set[str]:
    finder = modulefinder.ModuleFinder(path=[str(ROOT)])
    for entry in ENTRIES:
        finder.import_hook(entry)
    return {m for m in finder.modules if m.split(".")[0] in FIRST_PARTY}


def median_ms(fn, repeat: int) -> tuple[float, set[str]]:
    times, found = [], set()
    for _ in range(repeat):
        start = time.perf_counter()
        found = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ours, ours_found = median_ms(walk, args.repeat)
    theirs, theirs_found = median_ms(find, args.repeat)
    same = "same modules" if ours_found == theirs_found else "DIFFERENT modules"
    print(f"{len(ours_found)} modules ({same})")
    print(f"walk + hash: {ours:.1f} ms   modulefinder: {theirs:.1f} ms   ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
