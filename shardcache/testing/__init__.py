"""Real-server helpers for tests: local memcached clusters and a TCP fault proxy.

Users can import this module in their own test suites; it needs only the standard library (the
Docker backend imports ``testcontainers`` lazily, the TLS helper prefers ``cryptography``)::

    from shardcache.testing import FaultProxy, LocalCluster

    with LocalCluster(3) as cluster:              # backend="auto": containers if Docker works
        client = shardcache.Client(cluster.specs)  # ["127.0.0.1:41234", ...]
        cluster.nodes[1].kill()                    # a dead node: connections are refused
        cluster.nodes[1].start()                   # back, empty (a container may get a new port)
        cluster.nodes[2].pause()                   # a hung node: accepts TCP, never answers
        with FaultProxy(*cluster.nodes[0].address) as proxy:
            proxy.set_latency(0.005)               # +5 ms each way
            proxy.blackhole(); proxy.reset(); proxy.heal()

Nodes:

- :class:`ProcessNode` runs the local ``memcached`` binary on a free 127.0.0.1 port
  (``-l 127.0.0.1 -p PORT -U 0``), optionally with TLS (``tls=(certfile, keyfile)``).
- :class:`ContainerNode` runs the ``memcached:1.6`` image through testcontainers, published on
  127.0.0.1 only (build the image with ``tools/setup-docker.sh`` where no registry is reachable).
  A container started again after ``kill``/``stop`` gets a new host port: read ``node.port`` again.

Readiness is always a ``version`` round trip from the client side (the image has no shell). Every
wait is bounded, and everything started is stopped by its PID or container id, also at interpreter
exit if the caller forgot ``close()``.

Layout (private modules; import from ``shardcache.testing``): ``_nodes`` (the node interface,
:class:`ProcessNode`, the ``version`` probe), ``_docker`` (:class:`ContainerNode`), ``_cluster``
(:class:`LocalCluster`), ``_tls`` (:func:`make_self_signed_cert`), ``_proxy`` (:class:`FaultProxy`),
``_history`` (the pure history checker: :func:`check_history` over :class:`Op` records, see
benchmarks/history.py for the runner and nemesis that produce them).
"""

from shardcache.testing._cluster import LocalCluster
from shardcache.testing._docker import DEFAULT_IMAGE, ContainerNode, docker_unavailable_reason
from shardcache.testing._history import (
    Fault,
    History,
    HistoryReport,
    Op,
    Outcome,
    Violation,
    check_history,
    load_history,
)
from shardcache.testing._nodes import MemcachedNode, ProcessNode, ServerSetupError, probe_version
from shardcache.testing._proxy import FaultProxy
from shardcache.testing._tls import make_self_signed_cert

__all__ = [
    "DEFAULT_IMAGE",
    "ContainerNode",
    "Fault",
    "FaultProxy",
    "History",
    "HistoryReport",
    "LocalCluster",
    "MemcachedNode",
    "Op",
    "Outcome",
    "ProcessNode",
    "ServerSetupError",
    "Violation",
    "check_history",
    "docker_unavailable_reason",
    "load_history",
    "make_self_signed_cert",
    "probe_version",
]
