"""Node specs: every accepted way of naming a memcached server, parsed in one place.

Accepted forms (each may appear in a server list)::

    "10.0.0.1:11211"            host:port
    "cache-1"                   host (port 11211)
    "10.0.0.2:11211:3"          host:port:weight
    "10.0.0.2:11211:3 alpha"    twemproxy style: host:port:weight, then a name used for hashing
    "[::1]:11211"               IPv6 in brackets (optionally ":weight" after the port)
    "unix:/run/memcached.sock"  a unix socket
    ("10.0.0.1", 11211)         pymemcache's tuple form
    ("10.0.0.1", 11211, 3)      tuple with weight
    NodeSpec(...)               already parsed

A weight is an int in ``1..MAX_WEIGHT`` (1000): a node's share of keys is proportional to it, and
an mmh3 ring allocates points per unit of weight, so an unbounded weight is unbounded memory (see
``shardcache.ring.MAX_RING_POINTS`` for the bound on a whole ring). bool, float and str weights are
refused rather than converted.

A node id is the canonical ``host:port`` string (``[addr]:port`` for IPv6, ``unix:/path`` for unix
sockets). It is what the ring returns and what every per-node result is keyed by.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from shardcache.errors import ConfigurationError

__all__ = ["DEFAULT_PORT", "MAX_WEIGHT", "NodeSpec", "NodeSpecLike", "parse_node", "parse_nodes"]

DEFAULT_PORT = 11211
MAX_WEIGHT = 1000

_BAD_HOST_CHARS = re.compile(r"[\s\x00-\x1f\x7f/\[\]]")
_CONTROL_OR_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")
_ALIAS_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One memcached server: where it is, its weight on the ring, and an optional hashing alias.

    Immutable and hashable; safe to share between threads. ``unix`` specs have ``port == 0`` and the
    socket path in ``host``.
    """

    host: str
    port: int = DEFAULT_PORT
    weight: int = 1
    alias: str | None = None
    unix: bool = False

    @property
    def node_id(self) -> str:
        """The canonical id: ``host:port``, ``[v6addr]:port`` or ``unix:/path``."""
        if self.unix:
            return f"unix:{self.host}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int] | str:
        """What pymemcache's ``Client`` takes as its ``server`` argument."""
        if self.unix:
            return self.host
        return (self.host, self.port)

    def with_weight(self, weight: int) -> NodeSpec:
        """The same node with another weight."""
        return NodeSpec(self.host, self.port, _check_weight(weight, self.node_id), self.alias, self.unix)

    def __str__(self) -> str:
        return self.node_id


NodeSpecLike = NodeSpec | str | tuple[str, int] | tuple[str, int, int]


def _check_weight(weight: object, entry: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ConfigurationError(
            f"node spec {entry!r}: weight must be an int in 1..{MAX_WEIGHT}, got {weight!r}"
        )
    if not 1 <= weight <= MAX_WEIGHT:
        raise ConfigurationError(f"node spec {entry!r}: weight {weight} out of range 1..{MAX_WEIGHT}")
    return weight


def _check_port(port: object, entry: object) -> int:
    if isinstance(port, str):
        if not port.isdigit() or not port.isascii():
            raise ConfigurationError(f"node spec {entry!r}: port must be a number, got {port!r}")
        if len(port.lstrip("0")) > 5:  # before int(): thousands of digits raise ValueError
            raise ConfigurationError(f"node spec {entry!r}: port {port} out of range 1..65535")
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigurationError(f"node spec {entry!r}: port must be an int, got {port!r}")
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"node spec {entry!r}: port {port} out of range 1..65535")
    return port


def _check_host(host: object, entry: object, *, allow_v6: bool) -> str:
    if not isinstance(host, str) or not host:
        raise ConfigurationError(f"node spec {entry!r}: empty host")
    if _BAD_HOST_CHARS.search(host):
        raise ConfigurationError(f"node spec {entry!r}: invalid character in host {host!r}")
    if ":" in host and not allow_v6:
        raise ConfigurationError(
            f"node spec {entry!r}: IPv6 addresses must be written in brackets, e.g. '[::1]:11211'"
        )
    return host


def _parse_weight_text(text: str, entry: object) -> int:
    if not text.isdigit() or not text.isascii():
        raise ConfigurationError(
            f"node spec {entry!r}: weight must be an int in 1..{MAX_WEIGHT}, got {text!r}"
        )
    if len(text.lstrip("0")) > len(str(MAX_WEIGHT)):  # before int(): thousands of digits raise ValueError
        raise ConfigurationError(f"node spec {entry!r}: weight {text} out of range 1..{MAX_WEIGHT}")
    return _check_weight(int(text), entry)


def _parse_string(entry: str) -> NodeSpec:
    text = entry.strip()
    if not text:
        raise ConfigurationError(f"node spec {entry!r}: empty host")
    if re.search(r"[\x00-\x1f\x7f]", text):
        raise ConfigurationError(f"node spec {entry!r}: invalid character (control character)")
    alias: str | None = None
    parts = text.split()
    if len(parts) == 2 and parts[0].count(":") >= 2 and _ALIAS_OK.match(parts[1]):
        text, alias = parts  # twemproxy: "host:port:weight name"
    elif len(parts) > 1:
        raise ConfigurationError(
            f"node spec {entry!r}: unexpected whitespace (an alias needs the form 'host:port:weight name')"
        )
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/") or _CONTROL_OR_SPACE.search(path):
            raise ConfigurationError(
                f"node spec {entry!r}: unix socket path must be absolute, without spaces or control chars"
            )
        return NodeSpec(path, 0, 1, alias, unix=True)
    weight = 1
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigurationError(f"node spec {entry!r}: missing ']' after IPv6 address")
        host = _check_host(text[1:end], entry, allow_v6=True)
        rest = text[end + 1 :]
        port = DEFAULT_PORT
        if rest:
            if not rest.startswith(":"):
                raise ConfigurationError(f"node spec {entry!r}: expected ':port' after ']'")
            fields = rest[1:].split(":")
            if len(fields) > 2:
                raise ConfigurationError(f"node spec {entry!r}: too many ':' fields")
            port = _check_port(fields[0], entry)
            if len(fields) == 2:
                weight = _parse_weight_text(fields[1], entry)
        return NodeSpec(host, port, weight, alias)
    fields = text.split(":")
    if len(fields) > 3 and not text.startswith("unix:"):
        raise ConfigurationError(
            f"node spec {entry!r}: too many ':' fields (IPv6 addresses must be written in brackets)"
        )
    if text.startswith(":") and text.count(":") >= 2:
        raise ConfigurationError(
            f"node spec {entry!r}: IPv6 addresses must be written in brackets, e.g. '[::1]:11211'"
        )
    host = _check_host(fields[0], entry, allow_v6=False)
    port = _check_port(fields[1], entry) if len(fields) >= 2 else DEFAULT_PORT
    if len(fields) == 3:
        weight = _parse_weight_text(fields[2], entry)
    return NodeSpec(host, port, weight, alias)


def parse_node(entry: object) -> NodeSpec:
    """Parse one node spec in any accepted form; raise ``ConfigurationError`` naming it if bad."""
    if isinstance(entry, NodeSpec):
        _check_weight(entry.weight, entry)
        if entry.unix:
            return entry
        _check_host(entry.host, entry, allow_v6=True)
        _check_port(entry.port, entry)
        return entry
    if isinstance(entry, str):
        return _parse_string(entry)
    if isinstance(entry, tuple | list):
        if len(entry) not in (2, 3):
            raise ConfigurationError(f"node spec {entry!r}: expected (host, port) or (host, port, weight)")
        host = _check_host(entry[0], entry, allow_v6=True)
        port = _check_port(entry[1], entry)
        weight = _check_weight(entry[2], entry) if len(entry) == 3 else 1
        return NodeSpec(host, port, weight)
    raise ConfigurationError(f"node spec {entry!r}: expected a string, a (host, port) tuple or a NodeSpec")


def parse_nodes(entries: object) -> tuple[NodeSpec, ...]:
    """Parse a server list; raise ``ConfigurationError`` on an empty list, a bad entry or a duplicate.

    A single string is split on commas and semicolons (``"a:11211,b:11211"``), as in
    ``SHARDCACHE_SERVERS`` or Django's ``LOCATION``.
    """
    items: Iterable[object]
    if isinstance(entries, str):
        items = [part for part in re.split(r"[;,]", entries) if part.strip()]
    elif isinstance(entries, NodeSpec) or (
        isinstance(entries, tuple) and len(entries) in (2, 3) and isinstance(entries[1], int)
    ):
        items = [entries]
    elif isinstance(entries, Iterable):
        items = list(entries)
    else:
        raise ConfigurationError(f"server list {entries!r}: expected a list of node specs")
    specs: list[NodeSpec] = []
    seen: dict[str, object] = {}
    for entry in items:
        spec = parse_node(entry)
        if spec.node_id in seen:
            raise ConfigurationError(
                f"node spec {entry!r}: duplicate of {seen[spec.node_id]!r} (node id {spec.node_id})"
            )
        seen[spec.node_id] = entry
        specs.append(spec)
    if not specs:
        raise ConfigurationError("server list is empty: give at least one node")
    aliases = [s.alias for s in specs if s.alias is not None]
    if len(set(aliases)) != len(aliases):
        raise ConfigurationError(f"server list {entries!r}: duplicate alias")
    return tuple(specs)
