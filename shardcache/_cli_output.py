"""What every ``shardcache`` subcommand shares: its context, usage errors, exit codes, and output.

Output is a rich table for people or one JSON document. rich is the optional ``cli`` extra: it is
imported only when a command runs (``stdout_console()``), never when the CLI modules are imported, so
``--help`` works without it and a command without it is a usage error naming the extra.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import shardcache

if TYPE_CHECKING:  # rich is the optional 'cli' extra: imported when the command runs
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

EXIT_OK, EXIT_NODE_DOWN, EXIT_USAGE = 0, 1, 2
_CLI_HINT = "pip install 'shardcache[cli]'"
_NON_TTY_WIDTH = 200


class UsageError(Exception):
    """A bad argument or configuration: printed to stderr, exit code 2."""


@dataclass(frozen=True)
class Context:
    """What a subcommand runs with: the ring from ``--servers``, the output mode and the timeout."""

    ring: shardcache.Ring
    json: bool
    timeout: float
    console: Console


def stdout_console() -> Console:
    """The stdout console; ``UsageError`` naming the ``cli`` extra if rich is not installed."""
    try:
        from rich.console import Console  # noqa: PLC0415  (optional dependency: the 'cli' extra)
    except ImportError:
        raise UsageError(f"the shardcache command needs rich: {_CLI_HINT}") from None
    out = Console(file=sys.stdout, highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        # Piped output: don't squeeze tables into 80 columns.
        out = Console(file=sys.stdout, highlight=False, width=_NON_TTY_WIDTH)
    return out


def emit_json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


def pct(fraction: float | None, digits: int = 2) -> str:
    return "-" if fraction is None else f"{fraction * 100:.{digits}f}%"


def size(n: int | None) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def status_cell(up: bool) -> Text:
    from rich.text import Text  # noqa: PLC0415  (optional dependency, loaded by stdout_console() already)

    return Text("up", style="green") if up else Text("DOWN", style="bold red")


def plain_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str | Text]]) -> Table:
    """A table whose cells are plain text (node ids like ``[::1]:11211`` are not rich markup).

    A column title starting with ``>`` is right-aligned; ``Node``, ``From`` and ``To`` never wrap.
    """
    from rich.table import Table  # noqa: PLC0415  (optional dependency, loaded by stdout_console() already)
    from rich.text import Text  # noqa: PLC0415

    result = Table(title=Text(title))
    for column in columns:
        name = column.lstrip(">")
        result.add_column(
            name,
            justify="right" if column.startswith(">") else "left",
            no_wrap=name in ("Node", "From", "To"),
            overflow="fold",
        )
    for row in rows:
        result.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in row))
    return result
