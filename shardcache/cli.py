"""The ``shardcache`` command line: where keys live, what a ring change moves, how the nodes are doing.

Subcommands: ``locate`` and ``plan`` work on the ring alone (no network); ``rebalance``
(``shardcache._cli_rebalance``) cleans the nodes through one client; ``stats`` and ``ping`` ask
every node, each through its own single-node ``shardcache.Client`` so one node's failure is reported
for that node instead of failing the whole command. The nodes are queried in parallel and every call
has a timeout, so a dead or hung node costs about one timeout, never a stuck command.

Output is a rich table for people, or one JSON document with ``--json`` (keys documented in
docs/cli.md). Errors go to stderr. Exit codes: 0 ok, 1 a node is down, 2 usage or configuration error.
rich is the ``cli`` extra, imported when a command runs: without it every command exits 2 with
``pip install 'shardcache[cli]'``.

Only the public API is used, as for any other integration: ``import shardcache`` and the documented
``shardcache.nodes.MAX_WEIGHT``. ``plan`` lives in ``shardcache._cli_plan``; what every subcommand
shares (context, usage errors, output) in ``shardcache._cli_output``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import shardcache
from shardcache import _cli_plan, _cli_rebalance
from shardcache._cli_output import (
    EXIT_NODE_DOWN,
    EXIT_OK,
    EXIT_USAGE,
    Context,
    UsageError,
    duration,
    emit_json,
    pct,
    plain_table,
    size,
    status_cell,
    stdout_console,
)

if TYPE_CHECKING:  # rich is the optional 'cli' extra: imported when the command runs
    from rich.console import Console
    from rich.text import Text

__all__ = ["main"]

ENV_SERVERS = "SHARDCACHE_SERVERS"
_MAX_WORKERS = 32

T = TypeVar("T")


# -- argument parsing -------------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 100, got {text!r}")
    return int(text)


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before and after the subcommand (``top=False`` leaves the top's values alone)."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--servers",
        default=default(None),
        metavar="LIST",
        help=f"memcached nodes, e.g. 'a:11211,b:11211:2' (default: ${ENV_SERVERS})",
    )
    parser.add_argument(
        "--hashing",
        choices=("mmh3", "ketama"),
        default=default("mmh3"),
        help="how keys are placed on the ring (default: mmh3)",
    )
    parser.add_argument(
        "--ketama-naming",
        choices=("libmemcached", "libketama", "spymemcached"),
        default=default("libmemcached"),
        help="ketama point names, to match another client (default: libmemcached)",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print one JSON document")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=default(1.0),
        metavar="SECONDS",
        help="connect and reply timeout of each network call (default: 1.0)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardcache",
        description="Inspect a sharded memcached fleet: key placement, ring changes, node health.",
        epilog="Exit codes: 0 ok, 1 a node is down, 2 usage or configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"shardcache {shardcache.__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also print the library's log records to stderr"
    )
    _common_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, top=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    locate = sub.add_parser(
        "locate",
        parents=[common],
        help="the node of each key and its failover order (no network)",
        description="For each key: the node that owns it, then the nodes that take over in order.",
    )
    locate.add_argument("keys", nargs="+", metavar="KEY")

    plan = sub.add_parser(
        "plan",
        parents=[common],
        help="what a ring change moves (no network)",
        description=(
            "Key share per node before and after a change, the fraction of keys that move and where. "
            "Removals apply first, then additions, then weights."
        ),
    )
    _cli_plan.add_arguments(plan)

    sub.add_parser(
        "stats",
        parents=[common],
        help="items, memory, hit ratio, evictions... of every node",
        description="Ask every node for its stats; a node that does not answer in time is shown down.",
    )
    ping = sub.add_parser(
        "ping",
        parents=[common],
        help="round-trip time of every node",
        description=(
            "Open a connection to each node, then time N 'version' round trips on it and report "
            "the median. A node is down if any call fails."
        ),
    )
    ping.add_argument(
        "--count", type=_count, default=3, metavar="N", help="timed round trips per node (default: 3)"
    )
    _cli_rebalance.add_parser(sub, common)
    return parser


def _servers(args: argparse.Namespace) -> shardcache.Ring:
    given: str | None = args.servers
    source = "--servers"
    if given is None:
        given, source = os.environ.get(ENV_SERVERS), ENV_SERVERS
    if given is None or not given.strip():
        raise UsageError(f"no servers: pass --servers 'host:port,...' or set {ENV_SERVERS}")
    try:
        return shardcache.Ring(given, hashing=args.hashing, ketama_naming=args.ketama_naming)
    except shardcache.ConfigurationError as exc:
        raise UsageError(f"{source}: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 a node is down, 2 usage error)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's own usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    commands: dict[str, Callable[[Context, argparse.Namespace], int]] = {
        "locate": _locate,
        "plan": _cli_plan.plan,
        "stats": _stats,
        "ping": _ping,
        "rebalance": _cli_rebalance.rebalance,
    }
    try:
        context = Context(_servers(args), args.json, args.timeout, stdout_console())
        return commands[args.command](context, args)
    except UsageError as exc:
        print(f"shardcache: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `shardcache locate ... | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _configure_logging(verbose: bool) -> None:
    """Node failures are reported in the output, so the library's log records show only with -v."""
    library = logging.getLogger("shardcache")
    if not any(isinstance(h, logging.NullHandler) for h in library.handlers):
        library.addHandler(logging.NullHandler())  # no "last resort" printing of warnings to stderr
    if verbose:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )


# -- locate -----------------------------------------------------------------------------------------


def _locate(ctx: Context, args: argparse.Namespace) -> int:
    ring = ctx.ring
    placed = []
    for key in args.keys:
        # The bytes the user typed: str keys hash as UTF-8, and argv that is not UTF-8 is kept as is.
        raw = key.encode("utf-8", "surrogateescape")
        order = ring.preference_list(raw, len(ring))
        shown = raw.decode("utf-8", "backslashreplace")
        placed.append({"key": shown, "node": order[0], "preference_list": list(order)})
    if ctx.json:
        emit_json({"hashing": ring.hashing, "nodes": list(ring.nodes), "keys": placed})
        return EXIT_OK
    rows = [[p["key"], p["node"], " → ".join(p["preference_list"][1:]) or "-"] for p in placed]
    title = f"Key placement ({ring.hashing}, {len(ring)} nodes)"
    ctx.console.print(plain_table(title, ["Key", "Node", "Failover order"], rows))
    return EXIT_OK


# -- network commands -------------------------------------------------------------------------------


def _each_node(
    ctx: Context, probe: Callable[[shardcache.Client], T], what: str
) -> list[tuple[str, T | Exception]]:
    """Run ``probe`` against every node in parallel, each with its own single-node client.

    Returns ``(node_id, result or the NodeError)`` in server-list order.
    """

    def one(spec: shardcache.NodeSpec) -> tuple[str, T | Exception]:
        client = shardcache.Client([spec], connect_timeout=ctx.timeout, timeout=ctx.timeout)
        try:
            return spec.node_id, probe(client)
        except (shardcache.ShardcacheError, OSError) as exc:
            return spec.node_id, exc
        finally:
            client.close()

    specs = ctx.ring.specs
    with ThreadPoolExecutor(max_workers=min(len(specs), _MAX_WORKERS), thread_name_prefix=what) as pool:
        return list(pool.map(one, specs))


def _error_fields(exc: Exception | None) -> dict[str, Any]:
    if exc is None:
        return {"error": None, "error_type": None}
    return {"error": str(exc) or type(exc).__name__, "error_type": type(exc).__name__}


def _stat_int(stats: dict[bytes, Any], name: str) -> int | None:
    value = stats.get(name.encode())
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


_STAT_FIELDS: tuple[str, ...] = ("curr_items", "bytes", "limit_maxbytes", "get_hits", "get_misses")
_STAT_FIELDS += ("evictions", "curr_connections", "uptime")


def _stats_row(result: dict[bytes, Any] | Exception) -> dict[str, Any]:
    """One node's stats row; every row has the same keys, in the same order."""
    error = result if isinstance(result, Exception) else None
    row: dict[str, Any] = {"up": error is None, **_error_fields(error)}
    stats: dict[bytes, Any] = {} if isinstance(result, Exception) else result
    version = stats.get(b"version")
    row["version"] = version.decode("ascii", "replace") if isinstance(version, bytes) else version
    row.update({name: _stat_int(stats, name) for name in _STAT_FIELDS})
    hits, misses = row["get_hits"], row["get_misses"]
    lookups = (hits or 0) + (misses or 0)
    row["hit_ratio"] = (hits or 0) / lookups if lookups else None
    return row


def _print_nodes(
    console: Console,
    title: str,
    columns: list[str],
    nodes: dict[str, dict[str, Any]],
    cells: Callable[[dict[str, Any]], list[str]],
) -> None:
    """A per-node table: status, the ``cells`` of up nodes, and an Error column if any is down."""
    down = any(not row["up"] for row in nodes.values())
    rows: list[list[str | Text]] = []
    for node, row in nodes.items():
        cells_row: list[str | Text] = [node, status_cell(row["up"])]
        cells_row += cells(row) if row["up"] else ["-"] * len(columns)
        rows.append(cells_row + ([row["error"] or ""] if down else []))
    console.print(plain_table(title, ["Node", "Status", *columns] + (["Error"] if down else []), rows))


def _stats(ctx: Context, args: argparse.Namespace) -> int:
    def probe(client: shardcache.Client) -> dict[bytes, Any]:
        return next(iter(client.stats().values()))

    def cells(row: dict[str, Any]) -> list[str]:
        used, limit = row["bytes"], row["limit_maxbytes"]
        memory = f"{size(used)} / {size(limit)}" + (f" ({used / limit:.0%})" if used and limit else "")
        return [
            row["version"] or "-",
            str(row["curr_items"]),
            memory,
            pct(row["hit_ratio"], 1),
            str(row["evictions"]),
            str(row["curr_connections"]),
            duration(row["uptime"]),
        ]

    nodes = {node: _stats_row(result) for node, result in _each_node(ctx, probe, "stats")}
    down = sum(not row["up"] for row in nodes.values())
    if ctx.json:
        emit_json({"nodes": nodes, "up": len(nodes) - down, "down": down})
    else:
        columns = ["Version", ">Items", ">Memory used / limit", ">Hit ratio", ">Evictions", ">Connections"]
        title = f"memcached stats: {len(nodes) - down} up, {down} down"
        _print_nodes(ctx.console, title, [*columns, ">Uptime"], nodes, cells)
    return EXIT_NODE_DOWN if down else EXIT_OK


def _ping(ctx: Context, args: argparse.Namespace) -> int:
    count: int = args.count

    def probe(client: shardcache.Client) -> tuple[str, list[float]]:
        # The first call opens the connection (and reads the version); only later calls are timed.
        version = next(iter(client.version().values()))
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            client.version()
            samples.append((time.perf_counter() - start) * 1000)
        return version.decode("ascii", "replace"), samples

    def cells(row: dict[str, Any]) -> list[str]:
        samples = row["samples_ms"]
        return [row["version"], *(f"{ms:.3f} ms" for ms in (row["rtt_ms"], min(samples), max(samples)))]

    nodes: dict[str, dict[str, Any]] = {}
    for node, result in _each_node(ctx, probe, "ping"):
        error = result if isinstance(result, Exception) else None
        version, samples = (None, []) if isinstance(result, Exception) else result
        nodes[node] = {
            "up": error is None,
            **_error_fields(error),
            "version": version,
            "rtt_ms": statistics.median(samples) if samples else None,
            "samples_ms": samples,
        }
    down = sum(not row["up"] for row in nodes.values())
    if ctx.json:
        emit_json({"nodes": nodes, "count": count, "up": len(nodes) - down, "down": down})
    else:
        title = f"ping (median of {count} round trips): {len(nodes) - down} up, {down} down"
        _print_nodes(ctx.console, title, ["Version", ">RTT median", ">min", ">max"], nodes, cells)
    return EXIT_NODE_DOWN if down else EXIT_OK
