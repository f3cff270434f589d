"""``shardcache rebalance``: delete the copies nodes hold of keys they no longer own.

It runs :meth:`shardcache.Client.rebalance` with a client on the ``--servers`` list (the ring
every application process uses now), and prints one row per node (from the ``rebalanced``
events) and the totals. Without ``--key-prefix`` it would consider every key on the servers, other
applications' too: that takes ``--all-keys``, so it is never done by accident. ``--dry-run`` only
counts. Exit codes: 0 ok, 1 a node could not be listed or cleaned, 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import shardcache
from shardcache._cli_output import EXIT_NODE_DOWN, EXIT_OK, Context, UsageError, emit_json, plain_table

__all__ = ["add_parser", "rebalance"]

_FIELDS = ("scanned", "strays", "copied", "deleted", "changed", "gone", "skipped")


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected keys per second > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected keys per second > 0, got {text!r}")
    return value


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``rebalance`` subcommand, on ``sub`` (the subparsers), with the ``common`` options."""
    parser = sub.add_parser(
        "rebalance",
        parents=[common],
        help="delete the copies nodes hold of keys they no longer own",
        description=(
            "List every node's keys (lru_crawler metadump) and delete those the ring maps elsewhere, "
            "each only if unchanged since listed; keys whose owner is down are left alone. Run it "
            "with the server list every application process uses, after they all apply a change."
        ),
    )
    parser.add_argument("--key-prefix", default="", metavar="PREFIX", help="the applications' key_prefix")
    parser.add_argument(
        "--all-keys", action="store_true", help="without --key-prefix: every key on the servers, anyone's"
    )
    parser.add_argument("--keys-per-s", type=_rate, default=None, metavar="N", help="pace the deletes")
    parser.add_argument("--dry-run", action="store_true", help="only count what would be deleted")


def rebalance(ctx: Context, args: argparse.Namespace) -> int:
    if not args.key_prefix and not args.all_keys:
        raise UsageError("rebalance touches only keys under --key-prefix; pass --all-keys to take every key")
    rows: dict[str, dict[str, Any]] = {spec.node_id: {"done": False} for spec in ctx.ring.specs}

    def seen(event: shardcache.Event) -> None:
        if event.kind == "rebalanced":
            counts = dict(part.rsplit(" ", 1) for part in event.detail.split(", "))
            rows[event.node_id] = {"done": True, **{name: int(counts.get(name, 0)) for name in _FIELDS}}

    options = {"hashing": ctx.ring.hashing, "ketama_naming": ctx.ring.ketama_naming}
    client = shardcache.Client(
        list(ctx.ring.specs), connect_timeout=ctx.timeout, timeout=ctx.timeout, key_prefix=args.key_prefix,
        on_error="miss", **options,
    )  # fmt: skip
    try:
        client.add_listener(seen)
        # a listing can take seconds: 60 s for each (or --timeout if longer)
        report = client.rebalance(
            keys_per_s=args.keys_per_s, dry_run=args.dry_run, timeout_s=max(60.0, ctx.timeout)
        )
    except shardcache.ArgumentError as exc:
        raise UsageError(str(exc)) from None
    finally:
        client.close()
    if ctx.json:
        emit_json({"report": dataclasses.asdict(report), "nodes": rows, "dry_run": args.dry_run})
    else:
        header = ["Node", "Status", *(f">{name.capitalize()}" for name in _FIELDS)]
        table = [
            [node, "done" if row["done"] else "FAILED", *(str(row.get(name, "-")) for name in _FIELDS)]
            for node, row in rows.items()
        ]
        done = (
            f"would delete {report.strays - report.skipped}" if args.dry_run else f"deleted {report.deleted}"
        )
        title = f"rebalance: {report.strays} strays on {report.nodes} nodes, {done} in {report.seconds:.1f} s"
        ctx.console.print(plain_table(title, header, table))
    return EXIT_NODE_DOWN if report.failed_nodes else EXIT_OK
