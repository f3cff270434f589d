"""Requests that command flows yield, and the contract between flows and executors.

Every command (``get``, ``set_many``, ``cas_update``, a warm-up copy, a prober pass) is written once,
as a generator — a *flow* — that yields the I/O it needs and receives the result::

    reply = yield Call(node, payload, Expect.VALUES, "get", key)

An executor drives the flow: the sync client runs each request on blocking sockets, an asyncio
client would await it. A request that fails on its node is thrown into the flow as a ``NodeError``
at the ``yield``; a :class:`Fanout` returns per-node ``NodeError`` values instead. Flows never touch
sockets, clocks or sleeps themselves, so every decision in them exists once for every I/O flavour.

Deadlines: the client's ``timeout`` bounds each stretch of I/O in a flow; a :class:`Sleep` or
:class:`Compute` (the caller's own code) starts a new stretch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from shardcache._topology import Node
from shardcache.nodes import NodeSpec

__all__ = ["Call", "Compute", "Each", "Fanout", "Flow", "Job", "Probe", "Quiet", "Sleep"]

T = TypeVar("T")

# A job for one node: the bytes to send and, per request in them, the arguments of
# ReplyParser.expect: (Expect kind, has a data block[, keys asked for]). No entries: noreply
# requests (an ``mn`` is appended and nothing is awaited).
Job = tuple[bytes, Sequence[tuple[Any, ...]]]


class Call(NamedTuple):
    """One request to one node -> its reply."""

    node: Node
    payload: bytes
    kind: int
    what: str
    key: Any = None
    data_block: bool = False  # a text storage command: an error reply means the connection is out of step
    wanted: Any = None  # VALUES: the key(s) asked for; any other is a protocol error


class Quiet(NamedTuple):
    """noreply requests to one node -> None (nothing is awaited)."""

    node: Node
    payload: bytes
    what: str
    key: Any = None


class Fanout(NamedTuple):
    """Each node's job, all at once -> ``{node_id: [replies] | NodeError}``."""

    jobs: Mapping[str, tuple[Node, Job]]
    what: str
    key: Any = None


class Each(NamedTuple):
    """One request to each of ``nodes`` at once -> ``{node_id: reply | NodeError}``."""

    nodes: Sequence[Node]
    payload: bytes
    kind: int
    what: str


class Probe(NamedTuple):
    """A ``version`` round trip on a new connection (health probes) -> the version, or NodeError."""

    spec: NodeSpec


class Sleep(NamedTuple):
    """Pause (backoff between retries) -> None."""

    seconds: float


class Compute(NamedTuple):
    """Run the caller's function (``cas_update``'s ``fn``, a ``get_or_set`` factory) -> its result.
    An async executor awaits the result if it is awaitable."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


Request = Call | Quiet | Fanout | Each | Probe | Sleep | Compute
Flow = Generator[Request, Any, T]
