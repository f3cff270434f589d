"""A cluster of independent memcached nodes, on containers or local processes."""

from __future__ import annotations

import atexit
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Literal

from shardcache.testing._docker import DEFAULT_IMAGE, ContainerNode, docker_unavailable_reason
from shardcache.testing._nodes import MemcachedNode, ProcessNode, ServerSetupError

logger = logging.getLogger("shardcache.testing")

Backend = Literal["auto", "docker", "process"]


class LocalCluster:
    """``n`` independent memcached servers on 127.0.0.1, started in parallel when constructed.

    ``backend``: ``"docker"`` (containers, see :class:`ContainerNode`), ``"process"`` (local binary,
    :class:`ProcessNode`) or ``"auto"`` (docker when an engine answers and the image exists locally,
    else process); ``.backend`` tells which one runs. ``memcached_args`` go to every server.
    ``close()`` stops everything the cluster started; it is also a context manager.
    Not thread-safe: start, stop and change nodes from one thread; reading ``specs`` is fine.
    """

    def __init__(
        self,
        n: int = 3,
        backend: Backend = "auto",
        memcached_args: Sequence[str] = (),
        *,
        image: str = DEFAULT_IMAGE,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if backend not in ("auto", "docker", "process"):
            raise ValueError(f"backend must be 'auto', 'docker' or 'process', got {backend!r}")
        if isinstance(memcached_args, str):
            raise TypeError("memcached_args must be a sequence of arguments, not a string")
        self.image = image
        self.memcached_args = tuple(memcached_args)
        self.backend: Literal["docker", "process"] = "process"
        if backend != "process":
            reason = docker_unavailable_reason(image)
            if reason is None:
                self.backend = "docker"
            elif backend == "docker":
                raise ServerSetupError(f"backend 'docker' requested but {reason}")
            else:
                logger.info("LocalCluster: using processes, docker is not usable: %s", reason)
        self.nodes: list[MemcachedNode] = []
        atexit.register(self.close)
        try:
            self.add_nodes(n)
        except BaseException:
            self.close()
            raise

    def _new_node(self) -> MemcachedNode:
        if self.backend == "docker":
            return ContainerNode(image=self.image, memcached_args=self.memcached_args)
        return ProcessNode(memcached_args=self.memcached_args)

    def add_nodes(self, count: int = 1) -> list[MemcachedNode]:
        """Start ``count`` more servers (in parallel) and return them; they join ``nodes``."""
        new = [self._new_node() for _ in range(count)]
        self.nodes.extend(new)  # before starting, so close() cleans up after a partial failure
        with ThreadPoolExecutor(max_workers=min(count, 8), thread_name_prefix="LocalCluster") as pool:
            futures = [pool.submit(node.start) for node in new]
        for future in futures:
            exc = future.exception()
            if exc is not None:
                raise exc
        return new

    @property
    def specs(self) -> list[str]:
        """``["127.0.0.1:PORT", ...]`` in node order (current ports)."""
        return [node.spec for node in self.nodes]

    def flush_all(self) -> None:
        """``flush_all`` on every running, unpaused node."""
        for node in self.nodes:
            if node.is_running() and not node.is_paused():
                node.flush_all()

    def close(self) -> None:
        """Stop and remove every server this cluster started (in parallel). Idempotent."""
        nodes, self.nodes = list(self.nodes), []
        if nodes:
            with ThreadPoolExecutor(max_workers=min(len(nodes), 8)) as pool:
                results = list(pool.map(_close_quietly, nodes))
            failed = [r for r in results if r]
            if failed:
                logger.warning("LocalCluster.close: %s", "; ".join(failed))
        atexit.unregister(self.close)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalCluster {self.backend} {self.specs}>"


def _close_quietly(node: MemcachedNode) -> str:
    try:
        node.close()
    except Exception as exc:
        return f"{node.spec}: {exc!r}"
    return ""
