"""AsyncClient over in-memory servers (no sockets): the async executor drives the same flows, its
pools bound connections, and a task cancelled at any await never leaves a connection whose next
reply belongs to someone else."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest
from fakes import FakeClock, FakeServer

import shardcache
from shardcache import _aconn, _aexecutor
from shardcache._aconn import AsyncConnection
from shardcache._conn import ConnectionSettings
from shardcache.errors import NodeTimeoutError, NodeUnavailableError
from shardcache.nodes import NodeSpec

SERVERS = ["a:11211", "b:11211", "c:11211"]


class FakeTransport(asyncio.Transport):
    """Delivers a fake server's reply to each write, in ``chunk``-byte pieces, ``delay`` s apart."""

    def __init__(self, net: FakeNet, server: FakeServer, conn: AsyncConnection) -> None:
        super().__init__()
        self.net, self.server, self.conn = net, server, conn
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed, "write on a closed transport"
        reply = self.server.handle(bytes(data))
        if self.server.hang:
            return
        loop = asyncio.get_running_loop()
        size = self.net.chunk or max(len(reply), 1)
        for n, start in enumerate(range(0, len(reply), size)):
            loop.call_later(self.net.delay * (n + 1), self._deliver, reply[start : start + size])

    def _deliver(self, piece: bytes) -> None:
        if not self.closed:
            self.conn.data_received(piece)

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.net.closed += 1
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeNet:
    """What ``open_connection`` reaches in these tests: fake servers, no sockets."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.servers = {node_id: FakeServer(node_id, self.clock) for node_id in SERVERS}
        self.chunk = 0  # 0: each reply in one piece
        self.delay = 0.0
        self.opened = 0
        self.closed = 0

    async def open_connection(
        self, spec: NodeSpec, settings: ConnectionSettings, deadline: float | None
    ) -> AsyncConnection:
        server = self.servers[spec.node_id]
        await asyncio.sleep(0)
        if server.down:
            raise NodeUnavailableError(f"memcached node {spec.node_id}: refused", spec.node_id)
        conn = AsyncConnection(spec.node_id, settings.max_value, asyncio.get_running_loop())
        conn.connection_made(FakeTransport(self, server, conn))
        self.opened += 1
        return conn


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNet]:
    fake = FakeNet()
    monkeypatch.setattr(_aconn, "open_connection", fake.open_connection)
    monkeypatch.setattr(_aexecutor, "open_connection", fake.open_connection)
    yield fake


def _client(**options: Any) -> shardcache.AsyncClient:
    return shardcache.AsyncClient(SERVERS, **options)


@pytest.mark.asyncio
async def test_commands_run_the_shared_flows(net: FakeNet) -> None:
    async with _client() as client:
        assert await client.set("k", {"a": 1}) is True
        assert await client.get("k") == {"a": 1}
        assert await client.get("absent", "d") == "d"
        assert await client.set_many({f"m{i}": i for i in range(30)}) == []
        assert await client.get_many([f"m{i}" for i in range(32)]) == {f"m{i}": i for i in range(30)}
        _, token = await client.gets("k")
        assert token.node_id == client.node_for("k")
        assert await client.cas("k", 2, token) is True
        assert await client.cas("k", 3, token) is False
        assert await client.incr("n", 1, initial=1) == 1
        assert await client.incr("n", 5) == 6
        assert await client.cas_update("n2", lambda v: v + 1, initial=0) == 1

        async def double(v: int) -> int:
            return v * 2

        assert await client.cas_update("n2", double) == 2
        async with client.lock("job", ttl_s=5) as lock:
            assert await lock.locked()
        assert not await client.lock("job").locked()
        assert await client.delete("k") is True
        assert await client.get("k") is None
        assert set(await client.version()) == set(SERVERS)


@pytest.mark.asyncio
async def test_cached_wraps_coroutine_functions(net: FakeNet) -> None:
    calls: list[int] = []
    async with _client() as client:

        @client.cached(expire=60, key="sq/{0}")
        async def square(n: int) -> int:
            calls.append(n)
            return n * n

        assert [await square(3), await square(3)] == [9, 9]
        assert calls == [3]
        assert await square.invalidate(3) is True  # type: ignore[attr-defined]
        assert await square(3) == 9 and calls == [3, 3]


@pytest.mark.asyncio
async def test_the_pool_bounds_connections_and_waiters_get_them(net: FakeNet) -> None:
    net.delay = 0.001
    async with _client(max_pool_size=2) as client:
        await client.set_many({f"k{i}": i for i in range(50)})
        got = await asyncio.gather(*(client.get(f"k{i % 50}") for i in range(300)))
        assert got == [i % 50 for i in range(300)]
        assert client.open_connections() <= 2 * len(SERVERS)


@pytest.mark.asyncio
async def test_waiting_for_a_free_connection_is_not_a_node_failure(net: FakeNet) -> None:
    net.delay = 0.05
    async with _client(max_pool_size=1, timeout=0.02) as client:
        owner = client.node_for("k")
        results = await asyncio.gather(*(client.get("k") for _ in range(20)), return_exceptions=True)
        assert any(isinstance(r, NodeTimeoutError) for r in results)
        assert client.node_states()[owner] == "up"  # timeouts waiting for the pool do not count


@pytest.mark.asyncio
async def test_a_timed_out_exchange_closes_its_connection(net: FakeNet) -> None:
    async with _client(timeout=0.05) as client:
        owner = client.node_for("k")
        net.servers[owner].hang = True
        with pytest.raises(NodeTimeoutError):
            await client.get("k")
        assert client.open_connections() == 0
        net.servers[owner].hang = False
        await client.set("k", 1)
        assert await client.get("k") == 1


@pytest.mark.parametrize("point", ["waiting for the pool", "before the reply", "mid-reply", "fanout"])
@pytest.mark.asyncio
async def test_a_cancelled_call_never_leaves_its_reply_to_the_next_caller(net: FakeNet, point: str) -> None:
    net.delay = 0.02  # per piece of a reply
    net.chunk = 7 if point == "mid-reply" else 0
    values = {"x": "value-of-x" * 3, "y": "value-of-y" * 3, "z": "value-of-z"}
    async with _client(max_pool_size=1) as client:
        await client.set_many(values)
        blocker = None
        if point == "waiting for the pool":  # holds the node's only connection meanwhile
            blocker = asyncio.ensure_future(client.get("x"))
            await asyncio.sleep(0)
        call = client.get_many(["x", "y", "z"]) if point == "fanout" else client.get("x")
        victim = asyncio.ensure_future(call)
        # mid-reply: two 7-byte pieces of the reply have arrived, the rest has not
        await asyncio.sleep(0.05 if point == "mid-reply" else 0.005)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        if blocker is not None:
            assert await blocker == values["x"]
        # the next callers get their own replies, never the cancelled one's
        assert await client.get_many(["y", "z"]) == {"y": values["y"], "z": values["z"]}
        assert await client.get("x") == values["x"]
        assert client.open_connections() <= len(SERVERS)


@pytest.mark.asyncio
async def test_a_cancellation_storm_has_no_cross_talk_and_no_leak(net: FakeNet) -> None:
    net.delay = 0.0005
    net.chunk = 9
    rng = random.Random(7)
    async with _client(max_pool_size=3) as client:
        keys = [f"key{i}" for i in range(60)]
        await client.set_many({k: f"{k}-value" for k in keys})
        wrong: list[tuple[str, Any]] = []
        completed = 0

        async def one(key: str) -> None:
            nonlocal completed
            value = await client.get(key)
            completed += 1
            if value != f"{key}-value":
                wrong.append((key, value))

        tasks = [asyncio.ensure_future(one(rng.choice(keys))) for _ in range(1500)]
        for _ in range(40):
            await asyncio.sleep(rng.uniform(0, 0.003))
            for task in rng.sample(tasks, 30):
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert wrong == [] and completed > 100
        assert client.open_connections() <= 3 * len(SERVERS)
    assert net.opened - net.closed == 0  # aclose closed every idle connection; none in use is left


@pytest.mark.asyncio
async def test_the_prober_task_brings_a_down_node_back(net: FakeNet) -> None:
    async with _client(retry_interval_s=0.01, failure_threshold=1) as client:
        owner = client.node_for("k")
        net.servers[owner].down = True
        with pytest.raises(NodeUnavailableError):
            await client.get("k")
        assert client.node_states()[owner] == "down"
        net.servers[owner].down = False
        for _ in range(200):
            if client.node_states()[owner] == "up":
                break
            await asyncio.sleep(0.01)
        assert client.node_states()[owner] == "up"


def test_no_io_and_no_task_in_the_constructor(net: FakeNet) -> None:
    client = _client(discovery=lambda: SERVERS)  # no running loop here: nothing may need one
    assert client.open_connections() == 0 and net.opened == 0


@pytest.mark.asyncio
async def test_membership_changes_and_listeners(net: FakeNet) -> None:
    seen: list[str] = []
    async with _client() as client:
        client.add_listener(lambda event: seen.append(event.kind))
        net.servers["d:11211"] = FakeServer("d:11211", net.clock)
        await client.add_node("d:11211", warmup_s=5)
        assert "d:11211" in client.nodes and "node_added" in seen
        await client.remove_node("d:11211")
        assert await client.set_nodes(SERVERS) == ([], [])


@pytest.mark.asyncio
async def test_discovery_runs_as_a_task_once_the_client_is_used(net: FakeNet) -> None:
    net.servers["d:11211"] = FakeServer("d:11211", net.clock)
    found = [*SERVERS, "d:11211"]
    async with _client(discovery=lambda: found, discovery_interval_s=0.01, discovery_warmup_s=0) as client:
        await client.get("k")  # the first connection starts the discovery task
        for _ in range(300):
            if "d:11211" in client.nodes:
                break
            await asyncio.sleep(0.01)
        assert "d:11211" in client.nodes
