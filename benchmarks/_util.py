"""Small helpers shared by the benchmark scripts: timing, environment header, tables, JSON.

API (everything else is private):

``measure(fn, rounds, warmup=1, clock=time.perf_counter) -> Stats``
    Call ``fn()`` ``warmup`` times untimed, then ``rounds`` times, timing each call with ``clock``
    (wall time by default; ``time.process_time`` counts only this process's CPU time, which other load
    on a shared machine does not inflate). ``gc.collect()`` runs before each timed call, not inside it.
``measure_interleaved({name: fn}, rounds, warmup=1, clock=time.perf_counter) -> {name: Stats}``
    The same for several callables, taken round-robin (round 1 of every callable, then round 2, ...),
    so a burst of machine noise hits all of them rather than one.
``Stats``
    Seconds per call: ``median``, ``min``, ``max``, ``samples``; ``rate(n)`` is ``n / median``
    (e.g. operations per second when each call does ``n`` operations).
``environment(packages) -> dict`` / ``print_header(title, env)``
    Python, platform, date, CPUs, load average, the exact command line, git revision, package versions.
``print_table(title, headers, rows, notes=())``
    A plain-text table; cells are printed with ``str()``; numeric columns right-aligned.
``goal(ok) -> "PASS" | "MISS"`` and ``write_json(path, data)``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "Stats",
    "environment",
    "goal",
    "measure",
    "measure_interleaved",
    "print_header",
    "print_table",
    "write_json",
]


@dataclass(frozen=True)
class Stats:
    """Seconds per timed call."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def rate(self, n: int) -> float:
        """``n`` operations per call -> operations per second, from the median call."""
        return n / self.median

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "samples_s": self.samples}


Clock = Callable[[], float]


def _timed(fn: Callable[[], object], clock: Clock) -> float:
    gc.collect()
    start = clock()
    fn()
    return clock() - start


def measure(
    fn: Callable[[], object], rounds: int, warmup: int = 1, clock: Clock = time.perf_counter
) -> Stats:
    """Time ``rounds`` calls of ``fn()`` after ``warmup`` untimed ones."""
    return measure_interleaved({"_": fn}, rounds, warmup, clock)["_"]


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1, clock: Clock = time.perf_counter
) -> dict[str, Stats]:
    """Time each callable ``rounds`` times, round-robin, after ``warmup`` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            samples[name].append(_timed(fn, clock))
    return {name: Stats(tuple(values)) for name, values in samples.items()}


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def environment(packages: Iterable[str] = ()) -> dict[str, Any]:
    """What the figures depend on: interpreter, machine, command line, package versions."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    affinity = getattr(os, "sched_getaffinity", None)
    load = getattr(os, "getloadavg", None)
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity else None,
        "loadavg": [round(x, 2) for x in load()] if load else None,
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "git": _git_revision(),
        "packages": versions,
    }


def print_header(title: str, env: Mapping[str, Any]) -> None:
    print(title)
    print("=" * len(title))
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    print(f"python    {env['python']} on {env['platform']} ({env['machine']})")
    print(f"cpus      {env['cpu_count']} (usable: {env['cpus_usable']}), load average {env['loadavg']}")
    print(f"date      {env['date']}   git {env['git']}")
    print(f"packages  {packages}")
    print(f"command   {env['command']}")
    print()


def _is_number(cell: object) -> bool:
    if isinstance(cell, int | float):
        return True
    text = str(cell).split(" (")[0].replace(",", "").replace("%", "").rstrip("x").strip()
    try:
        float(text)
    except ValueError:
        return text in ("", "-", "n/a")
    return True


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], notes: Iterable[str] = ()
) -> None:
    """Print ``rows`` under ``headers``; columns whose cells all look numeric are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    print(f"## {title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    for note in notes:
        print(f"  {note}")
    print()


def goal(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON (``Stats`` values become dicts)."""

    def default(obj: object) -> Any:
        if isinstance(obj, Stats):
            return obj.as_dict()
        raise TypeError(f"not JSON serializable: {obj!r}")

    Path(path).write_text(json.dumps(data, indent=2, default=default) + "\n")
