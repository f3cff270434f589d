"""``shardcache plan``: what a ring change moves, from the ring alone (no network).

The key share of each node before and after the change (``Ring.share``), the fraction of keys that
move and from which node to which (``Ring.diff``); with ``--keys``, the same counted over a key file;
with ``--plot``, a bar chart drawn by matplotlib (the optional ``plot`` extra, imported only then).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import shardcache
from shardcache._cli_output import EXIT_OK, Context, UsageError, emit_json, pct, plain_table
from shardcache.nodes import MAX_WEIGHT

if TYPE_CHECKING:  # rich is the optional 'cli' extra: imported when the command runs
    from rich.console import Console

__all__ = ["add_arguments", "plan"]

_PLOT_HINT = "pip install 'shardcache[plot]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the ``plan`` subcommand."""
    parser.add_argument("--add", action="append", default=[], metavar="SPEC", help="add a node (repeatable)")
    parser.add_argument(
        "--remove", action="append", default=[], metavar="ID", help="remove a node (repeatable)"
    )
    parser.add_argument(
        "--weight", action="append", default=[], metavar="ID=W", help="set a node's weight (repeatable)"
    )
    parser.add_argument("--keys", metavar="FILE", help="also count these keys, one per line ('-': stdin)")
    parser.add_argument("--plot", metavar="FILE.png", help=f"draw the key share before/after ({_PLOT_HINT})")


def _resolve_id(ring: shardcache.Ring, given: str, option: str) -> str:
    """The node id on ``ring`` that ``given`` names (``cache-1`` names ``cache-1:11211``).

    ``option`` is how the error names what the user typed, e.g. ``--weight 'a=2'``.
    """
    if given in ring:
        return given
    try:
        node_id = shardcache.parse_nodes(given)[0].node_id
    except shardcache.ConfigurationError:
        node_id = given
    if node_id not in ring:
        raise UsageError(f"{option}: no such node {given!r} (nodes: {', '.join(ring.nodes)})")
    return node_id


def _apply_changes(before: shardcache.Ring, args: argparse.Namespace) -> shardcache.Ring:
    after = before
    for given in args.remove:
        node_id = _resolve_id(after, given, f"--remove {given!r}")
        if len(after) == 1:
            raise UsageError(f"--remove {given!r}: it is the last node; a ring needs at least one")
        after = after.without_node(node_id)
    for spec in args.add:
        try:
            after = after.with_node(spec)
        except shardcache.ConfigurationError as exc:
            raise UsageError(f"--add {spec!r}: {exc}") from None
    for item in args.weight:
        node, sep, weight = item.rpartition("=")
        if not sep or not node or not _is_weight(weight):
            raise UsageError(f"--weight {item!r}: expected ID=W with W an integer in 1..{MAX_WEIGHT}")
        node_id = _resolve_id(after, node, f"--weight {item!r}")
        try:
            after = after.with_weight(node_id, int(weight))
        except shardcache.ConfigurationError as exc:  # the ring's total weight is over its bound
            raise UsageError(f"--weight {item!r}: {exc}") from None
    return after


def _is_weight(text: str) -> bool:
    """Whether ``text`` is a node weight: ASCII digits for an int in 1..MAX_WEIGHT."""
    if not (text.isascii() and text.isdigit()):
        return False
    # Count the digits before int(): thousands of them make int() raise ValueError.
    return len(text.lstrip("0")) <= len(str(MAX_WEIGHT)) and 1 <= int(text) <= MAX_WEIGHT


def _read_keys(path: str) -> list[bytes]:
    """Keys from ``path`` (one per line, blank lines skipped), as bytes: placement hashes the bytes."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"--keys {path!r}: {exc.strerror or exc}") from None
    return [line for line in (raw.strip() for raw in data.splitlines()) if line]


def _weights(ring: shardcache.Ring) -> dict[str, int]:
    return {spec.node_id: spec.weight for spec in ring.specs}


def _check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401, PLC0415  (optional dependency, imported only for --plot)
    except ImportError:
        raise UsageError(f"--plot needs matplotlib: {_PLOT_HINT}") from None


def plan(ctx: Context, args: argparse.Namespace) -> int:
    """Report what the ``--remove``/``--add``/``--weight`` changes to ``ctx.ring`` move."""
    before = ctx.ring
    if args.plot:
        _check_plot_available()
    after = _apply_changes(before, args)
    keys = _read_keys(args.keys) if args.keys is not None else None
    diff = before.diff(after)
    nodes = _node_rows(before, after, keys)
    document = {
        "hashing": before.hashing,
        "before": list(before.nodes),
        "after": list(after.nodes),
        "nodes": nodes,
        "moved_fraction": diff.moved,
        "flows": [{"from": src, "to": dst, "fraction": frac} for (src, dst), frac in _largest_first(diff)],
        "keys": _key_report(before, after, keys, args.keys) if keys is not None else None,
        "plot": args.plot,
    }
    if args.plot:
        _draw_plan(args.plot, nodes, diff.moved, before.hashing)
    if ctx.json:
        emit_json(document)
    else:
        _print_plan(ctx.console, document)
    return EXIT_OK


def _node_rows(
    before: shardcache.Ring, after: shardcache.Ring, keys: list[bytes] | None
) -> dict[str, dict[str, Any]]:
    """One row per node on either ring (``before``'s order, then added nodes): its change, weight,
    share of the key space and, with ``keys``, how many of them it holds."""
    share_before, share_after = before.share(), after.share()
    weight_before, weight_after = _weights(before), _weights(after)
    count_before = Counter(map(before.node_for, keys or ()))
    count_after = Counter(map(after.node_for, keys or ()))
    nodes: dict[str, dict[str, Any]] = {}
    for node in dict.fromkeys((*before.nodes, *after.nodes)):
        wb, wa = weight_before.get(node), weight_after.get(node)
        status = (
            "added" if wb is None else "removed" if wa is None else "reweighted" if wb != wa else "unchanged"
        )
        nodes[node] = {
            "status": status,
            "weight_before": wb,
            "weight_after": wa,
            "share_before": share_before.get(node, 0.0),
            "share_after": share_after.get(node, 0.0),
            "keys_before": count_before[node] if keys is not None else None,
            "keys_after": count_after[node] if keys is not None else None,
        }
    return nodes


def _key_report(
    before: shardcache.Ring, after: shardcache.Ring, keys: list[bytes], file: str
) -> dict[str, Any]:
    """How many of ``keys`` (read from ``file``) move, and from which node to which."""
    diff = before.diff(after, keys)
    total = diff.keys_counted or 0
    return {
        "file": file,
        "total": total,
        "moved": round(diff.moved * total),
        "moved_fraction": diff.moved,
        "flows": [
            {"from": src, "to": dst, "keys": round(frac * total), "fraction": frac}
            for (src, dst), frac in _largest_first(diff)
        ],
    }


def _largest_first(diff: shardcache.RingDiff) -> list[tuple[tuple[str, str], float]]:
    """``diff.flows`` from the largest to the smallest, then by ``(from, to)``."""
    return sorted(diff.flows.items(), key=lambda item: (-item[1], item[0]))


def _print_plan(console: Console, doc: dict[str, Any]) -> None:
    keys = doc["keys"]
    columns = ["Node", "Change", ">Weight", ">Share before", ">Share after"]
    columns += [">Keys before", ">Keys after"] if keys is not None else []
    rows = []
    for node, row in doc["nodes"].items():
        wb, wa = row["weight_before"], row["weight_after"]
        weight = f"{wb}" if wb == wa else f"{'-' if wb is None else wb} → {'-' if wa is None else wa}"
        cells = [node, row["status"], weight, pct(row["share_before"]), pct(row["share_after"])]
        if keys is not None:
            cells += [str(row["keys_before"]), str(row["keys_after"])]
        rows.append(cells)
    title = f"Ring change ({doc['hashing']}): {len(doc['before'])} → {len(doc['after'])} nodes"
    console.print(plain_table(title, columns, rows))
    console.print(f"Keys that move: {pct(doc['moved_fraction'])} of the key space", markup=False)
    if keys is not None:
        console.print(
            f"Keys from {keys['file']} that move: {keys['moved']} of {keys['total']}"
            f" ({pct(keys['moved_fraction'])})",
            markup=False,
        )
    if doc["flows"]:
        counted = {(f["from"], f["to"]): str(f["keys"]) for f in keys["flows"]} if keys is not None else None
        rows = [
            [f["from"], f["to"], pct(f["fraction"])]
            + ([counted.get((f["from"], f["to"]), "0")] if counted is not None else [])
            for f in doc["flows"]
        ]
        columns = ["From", "To", ">Share of keys"] + ([">Keys"] if counted is not None else [])
        console.print(plain_table("Where the moving keys go", columns, rows))


def _draw_plan(path: str, nodes: dict[str, dict[str, Any]], moved: float, hashing: str) -> None:
    """A grouped bar chart of each node's key share before and after, written with the Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (optional dependency)
    from matplotlib.figure import Figure  # noqa: PLC0415

    labels = list(nodes)
    before = [nodes[n]["share_before"] * 100 for n in labels]
    after = [nodes[n]["share_after"] * 100 for n in labels]
    width = 0.4
    xs = range(len(labels))
    figure = Figure(figsize=(max(7.0, 1.1 * len(labels) + 2), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bars_before = axes.bar([x - width / 2 for x in xs], before, width, label="before", color="#8da0cb")
    bars_after = axes.bar([x + width / 2 for x in xs], after, width, label="after", color="#fc8d62")
    for bars, shares, side in ((bars_before, before, "weight_before"), (bars_after, after, "weight_after")):
        texts = ["" if nodes[n][side] is None else f"{s:.1f}" for n, s in zip(labels, shares, strict=True)]
        axes.bar_label(bars, labels=texts, fontsize=7, padding=2)
    ticks = [n if nodes[n]["status"] == "unchanged" else f"{n}\n({nodes[n]['status']})" for n in labels]
    axes.set_xticks(
        list(xs), ticks, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center"
    )
    axes.set_ylabel("share of keys (%)")
    axes.set_ylim(0, max([*before, *after, 1.0]) * 1.3)
    axes.set_title(f"Key share per node, before and after ({hashing})\n{moved * 100:.1f}% of keys move")
    axes.legend(loc="upper right", ncols=2)
    axes.grid(axis="y", alpha=0.3)
    try:
        figure.savefig(path, format="png", dpi=120)
    except OSError as exc:
        raise UsageError(f"--plot {path!r}: {exc.strerror or exc}") from None
