"""Pipelined memcached text-protocol exchanges for multi-key calls.

A multi-key call writes its whole request to every node first, then reads each node's replies, so the
nodes work at the same time and the call costs about one round trip. Requests are cut into rounds of
at most ``ROUND_BYTES`` per node so a node never has to stall its replies while we are still writing
to it (a large pipelined write to a server whose output we are not reading can deadlock).

Everything here is private; the client owns the connections (pymemcache ``Client`` objects, whose
``sock`` this module reads and writes between their own commands).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    MemcacheUnknownError,
)

from shardcache._pool import NodePool

__all__ = [
    "ROUND_BYTES",
    "Reader",
    "connected",
    "delete_commands",
    "delete_everywhere",
    "exchange",
    "fetch_one",
    "raise_for_error",
    "read_delete_replies",
    "read_deleted",
    "read_stored",
    "read_values",
    "rounds",
    "store_one",
]

T = TypeVar("T")

ROUND_BYTES = 128 * 1024
_RECV = 256 * 1024


class Reader:
    """Reads replies from one socket: lines, and values of a known length. Not thread-safe."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def _fill(self) -> None:
        chunk = self._sock.recv(_RECV)
        if not chunk:
            raise MemcacheUnexpectedCloseError()
        self._buf = self._buf[self._pos :] + chunk if self._pos < len(self._buf) else chunk
        self._pos = 0

    def line(self) -> bytes:
        """The next line, without its ``\\r\\n``."""
        end = self._buf.find(b"\r\n", self._pos)
        while end < 0:
            self._fill()
            end = self._buf.find(b"\r\n", self._pos)
        line = self._buf[self._pos : end]
        self._pos = end + 2
        return line

    def value(self, size: int) -> bytes:
        """The next ``size`` bytes of a value and its trailing ``\\r\\n``."""
        need = size + 2
        available = len(self._buf) - self._pos
        if available >= need:
            start = self._pos
            self._pos += need
            data = self._buf[start : start + size]
        else:
            out = bytearray(need)
            view = memoryview(out)
            view[:available] = self._buf[self._pos :]
            got = available
            while got < need:
                n = self._sock.recv_into(view[got:])
                if not n:
                    raise MemcacheUnexpectedCloseError()
                got += n
            self._buf, self._pos = b"", 0
            if out[size:] != b"\r\n":
                raise MemcacheUnknownError(b"value not terminated by CRLF")
            return bytes(view[:size])
        if self._buf[self._pos - 2 : self._pos] != b"\r\n":
            raise MemcacheUnknownError(b"value not terminated by CRLF")
        return data


def raise_for_error(line: bytes) -> None:
    """Raise pymemcache's exception for an ``ERROR``/``CLIENT_ERROR``/``SERVER_ERROR`` reply line."""
    if line.startswith(b"CLIENT_ERROR"):
        raise MemcacheClientError(line[13:])
    if line.startswith(b"SERVER_ERROR"):
        raise MemcacheServerError(line[13:])
    if line.startswith(b"ERROR"):
        raise MemcacheUnknownCommandError(line)
    raise MemcacheUnknownError(line[:32])


def rounds(items: Sequence[Any], size_of: Callable[[Any], int]) -> Iterable[Sequence[Any]]:
    """Split ``items`` into consecutive slices of at most ``ROUND_BYTES`` (at least one item each)."""
    if sum(map(size_of, items)) <= ROUND_BYTES:
        yield items  # the common case: one round
        return
    start, total = 0, 0
    for i, item in enumerate(items):
        size = size_of(item)
        if i > start and total + size > ROUND_BYTES:
            yield items[start:i]
            start, total = i, 0
        total += size
    if start < len(items):
        yield items[start:]


def read_values(
    reader: Reader,
    commands: int,
    deserialize: Callable[[bytes, bytes, int], Any],
    with_cas: bool,
    refused: list[tuple[bytes, Exception]] | None = None,
) -> dict[bytes, Any]:
    """Read the replies to ``commands`` pipelined get/gets commands: ``{wire_key: value}``.

    With ``with_cas`` each value is ``(value, cas_bytes)``. A value the serde refuses is left out
    and ``(wire_key, exception)`` appended to ``refused`` (raised at once if ``refused`` is None);
    the rest of the stream is still read, so the connection stays in step.
    """
    found: dict[bytes, Any] = {}
    fields = 5 if with_cas else 4
    remaining = commands
    buf, pos = reader._buf, reader._pos
    while remaining:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            reader._buf, reader._pos = buf, pos
            reader._fill()
            buf, pos = reader._buf, reader._pos
            continue
        if end - pos == 3 and buf[pos:end] == b"END":
            pos = end + 2
            remaining -= 1
            continue
        line = buf[pos:end]
        parts = line.split()
        if len(parts) != fields or parts[0] != b"VALUE":
            reader._buf, reader._pos = buf, end + 2
            raise_for_error(line)
        try:
            size, flags = int(parts[3]), int(parts[2])
        except ValueError:
            raise MemcacheUnknownError(line[:32]) from None
        start = end + 2
        stop = start + size
        if stop + 2 <= len(buf):
            if buf[stop : stop + 2] != b"\r\n":
                raise MemcacheUnknownError(b"value not terminated by CRLF")
            data = buf[start:stop]
            pos = stop + 2
        else:
            reader._buf, reader._pos = buf, start
            data = reader.value(size)
            buf, pos = reader._buf, reader._pos
        key = parts[1]
        try:
            value = deserialize(key, data, flags)
        except Exception as exc:
            if refused is None:
                raise
            refused.append((key, exc))
            continue
        found[key] = (value, parts[4]) if with_cas else value
    reader._buf, reader._pos = buf, pos
    return found


def connected(conn: PymemcacheClient) -> socket.socket:
    """The socket of a pymemcache connection, connecting it first if needed."""
    if conn.sock is None:
        conn._connect()
    sock: socket.socket = conn.sock
    return sock


def fetch_one(
    sock: socket.socket, command: bytes, wire: bytes, with_cas: bool
) -> tuple[bytes, int, bytes] | None:
    """Send one get/gets ``command`` for ``wire`` and read its reply: ``(data, flags, cas)`` or None.

    A reply for any other key means the stream is out of step: ``MemcacheUnknownError`` (the
    caller drops the connection), never another key's value.
    """
    sock.sendall(command)
    reader = Reader(sock)
    line = reader.line()
    if line == b"END":
        return None
    parts = line.split()
    if len(parts) != (5 if with_cas else 4) or parts[0] != b"VALUE" or parts[1] != wire:
        raise_for_error(line)
    try:
        size, flags = int(parts[3]), int(parts[2])
    except ValueError:
        raise MemcacheUnknownError(line[:32]) from None
    data = reader.value(size)
    end = reader.line()
    if end != b"END":
        raise_for_error(end)
    return data, flags, parts[4] if with_cas else b""


def store_one(sock: socket.socket, command: bytes, noreply: bool) -> bool:
    """Send one storage ``command``: True if stored, False if not (add/replace/cas conditions)."""
    sock.sendall(command)
    if noreply:
        return True
    line = Reader(sock).line()
    if line == b"STORED":
        return True
    if line in (b"NOT_STORED", b"EXISTS", b"NOT_FOUND"):
        return False
    raise_for_error(line)
    return False


def read_stored(reader: Reader, count: int) -> list[bool | MemcacheServerError]:
    """Read ``count`` storage replies: True (stored), False (not stored), or the server's refusal.

    A ``SERVER_ERROR`` (an item over the size limit) refuses one item; memcached discards its data
    and the stream stays in step, so the other replies are still read.
    """
    results: list[bool | MemcacheServerError] = []
    for _ in range(count):
        line = reader.line()
        if line == b"STORED":
            results.append(True)
        elif line in (b"NOT_STORED", b"EXISTS", b"NOT_FOUND"):
            results.append(False)
        elif line.startswith(b"SERVER_ERROR"):
            results.append(MemcacheServerError(line[13:]))
        else:
            raise_for_error(line)
    return results


def read_deleted(reader: Reader, count: int) -> list[bool]:
    """Read ``count`` delete replies: True (deleted) or False (not found)."""
    results: list[bool] = []
    for _ in range(count):
        line = reader.line()
        if line == b"DELETED":
            results.append(True)
        elif line == b"NOT_FOUND":
            results.append(False)
        else:
            raise_for_error(line)
    return results


def exchange(
    pools: Mapping[str, NodePool],
    groups: Mapping[str, Sequence[Any]],
    encode: Callable[[Sequence[Any]], bytes],
    decode: Callable[[Reader, Sequence[Any]], T] | None,
    size_of: Callable[[Any], int],
) -> tuple[dict[str, list[T]], dict[str, Exception]]:
    """Pipeline requests to every node at once, in rounds; results and failures by node id.

    Each round writes one chunk (see ``rounds``) to every node that has work left, then reads each
    node's replies with ``decode`` (None: nothing to read, for noreply). A node that fails is dropped
    from later rounds; its connection is closed, the others go back to their pools.
    """
    pending = {node: iter(rounds(items, size_of)) for node, items in groups.items() if items}
    results: dict[str, list[T]] = {node: [] for node in pending}
    errors: dict[str, Exception] = {}
    while pending:
        inflight: list[tuple[str, NodePool, PymemcacheClient, Sequence[Any]]] = []
        for node in list(pending):
            chunk = next(pending[node], None)
            if chunk is None:
                del pending[node]
                continue
            pool = pools[node]
            conn = pool.acquire()
            try:
                connected(conn).sendall(encode(chunk))
            except Exception as exc:
                pool.discard(conn)
                errors[node] = exc
                del pending[node]
                continue
            inflight.append((node, pool, conn, chunk))
        for node, pool, conn, chunk in inflight:
            if decode is None:
                pool.release(conn)
                continue
            try:
                results[node].append(decode(Reader(conn.sock), chunk))
            except Exception as exc:
                pool.discard(conn)
                errors[node] = exc
                pending.pop(node, None)
            else:
                pool.release(conn)
    return results, errors


def delete_commands(wires: Sequence[bytes], noreply: bool = False) -> bytes:
    """Pipelined ``delete`` commands for ``wires``."""
    end = b" noreply\r\n" if noreply else b"\r\n"
    return b"".join(b"delete " + wire + end for wire in wires)


def read_delete_replies(reader: Reader, wires: Sequence[bytes]) -> list[bool]:
    """The replies to ``delete_commands(wires)``."""
    return read_deleted(reader, len(wires))


def delete_everywhere(
    pools: Mapping[str, NodePool], groups: Mapping[str, Sequence[bytes]], *, noreply: bool = False
) -> dict[str, Exception]:
    """Delete ``{node_id: wires}`` on every node at once; the nodes that failed."""
    _, errors = exchange(
        pools, groups, lambda wires: delete_commands(wires, noreply),
        None if noreply else read_delete_replies, lambda wire: len(wire) + 9,
    )  # fmt: skip
    return errors
