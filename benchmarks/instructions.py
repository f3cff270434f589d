"""Instructions per call, for comparing two trees deterministically on a noisy machine.

    for n in 100 300; do OPENBLAS_NUM_THREADS=1 PYTHONHASHSEED=0 valgrind --tool=callgrind \\
        --callgrind-out-file=/tmp/cg.$n PYTHON -m benchmarks.instructions OP $n --ports P1,P2,P3,P4
    done

Runs ``N`` calls of one workload (``get``, ``set``, ``get_many`` of 100 keys, ``set_many`` of 100)
against already running memcached nodes on 127.0.0.1 (``--ports``), after a warm-up. Under
callgrind, the difference of the totals of two runs divided by the difference of their ``N`` is
the instructions per call, without the start-up cost: (Ir(300) - Ir(100)) / 200. Set
``OPENBLAS_NUM_THREADS=1`` (numpy's idle thread otherwise adds millions of instructions) and do not
run under ``python -I`` (it ignores ``PYTHONHASHSEED``). Run the same command with the other tree's
interpreter for the comparison. Nothing is asserted.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import shardcache

VALUE = 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=("get", "set", "get_many", "set_many"))
    parser.add_argument("n", type=int)
    parser.add_argument("--ports", default="23101,23102,23103,23104")
    args = parser.parse_args()
    specs = [f"127.0.0.1:{int(p)}" for p in args.ports.split(",")]
    client = shardcache.Client(specs, connect_timeout=1.0, timeout=1.0, no_delay=True, default_noreply=False)

    def value(key: str) -> bytes:
        return (key.encode() + b":" + b"v" * VALUE)[:VALUE]

    many = [f"ic:gm:{i:03d}" for i in range(100)]
    many_values = {k: value(k) for k in many}
    to_set = {k: value(k) for k in (f"ic:sm:{i:03d}" for i in range(100))}
    single = [f"ic:s:{i:03d}" for i in range(100)]
    one = value("single")
    assert not client.set_many(many_values) and client.get_many(many) == many_values
    for key in single:
        client.set(key, one)
    calls: dict[str, Callable[[int], object]] = {
        "get_many": lambda i: client.get_many(many),
        "set_many": lambda i: client.set_many(to_set),
        "get": lambda i: client.get(many[i % 100]),
        "set": lambda i: client.set(single[i % 100], one),
    }
    call = calls[args.op]
    for i in range(50):  # warm-up: connections made, caches filled
        call(i)
    for i in range(args.n):
        call(i)
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
