"""Ring benchmarks: shardcache.Ring against its peers, side by side in one process, same keys.

    .venv/bin/python -m benchmarks.ring_bench [--rounds 5] [--quick] [--cpu-time] [--json FILE]

Peers: shardcache ``Ring`` (mmh3 and ketama modes), uhashring ``HashRing`` (its default md5 ring and
``hash_fn="ketama"``), pymemcache ``RendezvousHash``. Nothing is contacted: node names are strings
``10.0.X.Y:11211`` and keys are ``books/<i>``.

Sections: 1. lookups/s at N = 4 (str and bytes keys), 100, 1000; 2. balance at N = 100; 3. keys moved
when node N+1 is added, and between untouched nodes when a weighted node is removed; 4. build time and
memory of a 1000-node ring; 5. ``with_node``/``without_node`` at 1000 nodes. Goals are printed as
PASS/MISS beside the figures; nothing asserts. Timings are medians over ``--rounds`` rounds, taken
round-robin across the peers so that machine noise hits all of them.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mmh3
from pymemcache.client.rendezvous import RendezvousHash
from uhashring import HashRing

from benchmarks._util import (
    Stats,
    environment,
    goal,
    measure_interleaved,
    print_header,
    print_table,
    write_json,
)
from shardcache import Ring

Lookup = Callable[[Any], Any]

MMH3, KETAMA = "shardcache mmh3", "shardcache ketama"
UH_DEFAULT, UH_KETAMA = "uhashring default", "uhashring ketama"
RENDEZVOUS = "pymemcache rendezvous"


@dataclass(frozen=True)
class Settings:
    rounds: int
    keys: int  # distinct keys for lookups, balance and movement
    rendezvous_keys: dict[int, int]  # per N: RendezvousHash is O(N) per lookup
    big: int  # ring size for build time, memory and swaps (1000; smaller with --quick)
    build_rounds: int  # a 1000-node build takes seconds: 3 rounds unless --rounds is given
    cpu_time: bool  # time with time.process_time instead of wall time

    @property
    def clock(self) -> Callable[[], float]:
        return time.process_time if self.cpu_time else time.perf_counter


def settings(quick: bool, rounds: int | None, cpu_time: bool) -> Settings:
    if quick:
        return Settings(rounds or 2, 20_000, {4: 2_000, 100: 200, 1000: 50}, 100, rounds or 1, cpu_time)
    return Settings(rounds or 5, 200_000, {4: 20_000, 100: 2_000, 1000: 500}, 1000, rounds or 3, cpu_time)


def node_names(n: int) -> list[str]:
    """``10.0.X.Y:11211`` for the first ``n`` nodes (250 per /24)."""
    return [f"10.0.{i // 250}.{i % 250 + 1}:11211" for i in range(n)]


def key_names(n: int) -> list[str]:
    return [f"books/{i}" for i in range(n)]


# -- the rings under test ----------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[Any], Any]] = {
    MMH3: Ring,
    KETAMA: lambda nodes: Ring(nodes, hashing="ketama"),
    UH_DEFAULT: HashRing,
    UH_KETAMA: lambda nodes: HashRing(nodes, hash_fn="ketama"),
    RENDEZVOUS: lambda nodes: RendezvousHash(list(nodes)),
}


def lookup_of(ring: Any) -> Lookup:
    """The bound lookup method: ``node_for`` for shardcache, ``get_node`` for the peers."""
    return ring.node_for if isinstance(ring, Ring) else ring.get_node


def rendezvous_standin(nodes: Sequence[str]) -> Lookup:
    """pymemcache's RendezvousHash formula (highest murmur3_32 of ``"node-key"``, ties to the larger
    node name) with the C ``mmh3`` instead of pymemcache's pure-Python murmur3; identical for ASCII
    keys, and checked key for key against the real class before use. Only used for the 200k-key
    balance count, which would take minutes with the real class."""
    prefixed = [(f"{node}-", node) for node in nodes]
    h = mmh3.hash

    def get_node(key: str) -> str:
        return max((h(prefix + key, 0, False), node) for prefix, node in prefixed)[1]

    return get_node


def assign(lookup: Lookup, keys: Sequence[Any]) -> list[str]:
    return list(map(lookup, keys))


def loop(lookup: Lookup, keys: Sequence[Any]) -> Callable[[], None]:
    def run() -> None:
        for key in keys:
            lookup(key)

    return run


def fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}"


def spread(stats: Stats) -> str:
    """Half the min-max range as a percentage of the median."""
    return f"±{(stats.max - stats.min) / 2 / stats.median * 100:.0f}%"


# -- 1. lookups/s ------------------------------------------------------------------------------------

SPEED_CASES = (("N=4", 4, "str"), ("N=4 bytes", 4, "bytes"), ("N=100", 100, "str"), ("N=1000", 1000, "str"))


def bench_lookups(s: Settings, keys: list[str], goals: list[dict[str, Any]]) -> dict[str, Any]:
    bytes_keys = [k.encode() for k in keys]
    rates: dict[str, dict[str, float]] = {case: {} for case, _, _ in SPEED_CASES}
    stats: dict[str, dict[str, Stats]] = {}
    counts: dict[str, dict[str, int]] = {}
    for case, n, kind in SPEED_CASES:
        case_keys: list[Any] = bytes_keys if kind == "bytes" else keys
        runs, counts[case] = {}, {}
        for name, build in BUILDERS.items():
            ks = case_keys[: s.rendezvous_keys[n]] if name == RENDEZVOUS else case_keys
            lookup = lookup_of(build(node_names(n)))
            loop(lookup, ks[: len(ks) // 10])()  # warm-up
            runs[name], counts[case][name] = loop(lookup, ks), len(ks)
        stats[case] = measure_interleaved(runs, s.rounds, warmup=0, clock=s.clock)
        for name, st in stats[case].items():
            rates[case][name] = st.rate(counts[case][name])

    headers = ["lookups/s (median)", *(case for case, _, _ in SPEED_CASES)]
    rows = [
        [name, *(f"{fmt_rate(rates[c][name])} ({spread(stats[c][name])})" for c, _, _ in SPEED_CASES)]
        for name in BUILDERS
    ]
    rk = s.rendezvous_keys
    print_table(
        f"1. node_for / get_node lookups per second ({len(keys):,} distinct keys, {s.rounds} rounds)",
        headers,
        rows,
        [
            "(±x%) = half the min-max range over rounds, relative to the median.",
            f"rendezvous is O(N) per lookup: timed on the first {rk[4]:,} / {rk[100]:,} / {rk[1000]:,} keys "
            "at N=4 / 100 / 1000.",
            "bytes keys: uhashring and rendezvous hash str(key), i.e. \"b'books/1'\"; shardcache hashes",
            "the bytes themselves. Each timed round is one pass over the keys, after a 10% warm-up pass.",
        ],
    )

    pairs = [
        (f"{MMH3} / {UH_DEFAULT}", MMH3, UH_DEFAULT),
        (f"{MMH3} / {UH_KETAMA}", MMH3, UH_KETAMA),
        (f"{KETAMA} / {UH_KETAMA}", KETAMA, UH_KETAMA),
        (f"{MMH3} / {RENDEZVOUS}", MMH3, RENDEZVOUS),
        (f"{KETAMA} / {RENDEZVOUS}", KETAMA, RENDEZVOUS),
    ]
    ratios = {
        label: {case: rates[case][a] / rates[case][b] for case, _, _ in SPEED_CASES} for label, a, b in pairs
    }
    print_table(
        "1b. speed ratios (median lookups/s)",
        ["ratio", *(case for case, _, _ in SPEED_CASES)],
        [[label, *(f"{ratios[label][c]:,.1f}x" for c, _, _ in SPEED_CASES)] for label, _, _ in pairs],
    )

    checks = [
        (f"{MMH3} ≥ 2,000,000 lookups/s at N=4", rates["N=4"][MMH3], 2e6, fmt_rate),
        (f"{MMH3} ≥ 2,000,000 lookups/s at N=1000", rates["N=1000"][MMH3], 2e6, fmt_rate),
        (f"{MMH3} ≥ 5x {UH_DEFAULT} at N=4", ratios[pairs[0][0]]["N=4"], 5, "{:.2f}x".format),
        (f"{MMH3} ≥ 8x {UH_DEFAULT} at N=1000", ratios[pairs[0][0]]["N=1000"], 8, "{:.2f}x".format),
    ]
    checks += [
        (f"{KETAMA} ≥ 3x {UH_KETAMA} at {case}", ratios[pairs[2][0]][case], 3, "{:.2f}x".format)
        for case in ("N=4", "N=100", "N=1000")
    ]
    rows = []
    for label, value, target, fmt in checks:
        ok = value >= target
        goals.append({"goal": label, "value": value, "pass": ok})
        rows.append([label, fmt(value), goal(ok)])
    print_table("1c. lookup goals", ["goal", "measured", ""], rows)
    return {"lookups_per_s": rates, "timings": stats, "keys_timed": counts, "ratios": ratios}


# -- 2. balance --------------------------------------------------------------------------------------


def exact_share_from_points(points: list[tuple[int, str]], space: int) -> Counter[str]:
    """uhashring ownership from its sorted ``get_points()``: a hash ``h`` goes to the first point > h
    (it uses ``bisect_right``), wrapping around to the first point."""
    owned: Counter[str] = Counter()
    prev = 0
    for point, node in points:
        owned[node] += point - prev
        prev = point
    owned[points[0][1]] += space - prev
    return owned


def max_min_over_mean(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return max(values) / mean, min(values) / mean


def bench_balance(keys: list[str], goals: list[dict[str, Any]]) -> dict[str, Any]:
    n = 100
    nodes = node_names(n)
    rings = {name: build(nodes) for name, build in BUILDERS.items()}
    exact: dict[str, tuple[float, float]] = {}
    for name in (MMH3, KETAMA):
        exact[name] = max_min_over_mean(list(rings[name].share().values()))
    for name, space in ((UH_DEFAULT, 1 << 128), (UH_KETAMA, 1 << 32)):
        owned = exact_share_from_points(rings[name].get_points(), space)
        exact[name] = max_min_over_mean([owned[node] for node in nodes])

    sample = keys[:2_000]
    standin = rendezvous_standin(nodes)
    standin_ok = assign(rings[RENDEZVOUS].get_node, sample) == assign(standin, sample)
    counted: dict[str, tuple[float, float]] = {}
    for name, ring in rings.items():
        lookup = standin if name == RENDEZVOUS else lookup_of(ring)
        per_node = Counter(assign(lookup, keys))
        counted[name] = max_min_over_mean([per_node[node] for node in nodes])

    rows = []
    for name in BUILDERS:
        mx, mn = exact.get(name, (None, None))
        verdict = ""
        if name == MMH3 and mx is not None:
            goals.append({"goal": f"{MMH3} max/mean ≤ 1.10 at N=100", "value": mx, "pass": mx <= 1.10})
            verdict = f"{goal(mx <= 1.10)} (≤ 1.10)"
        rows.append(
            [
                name,
                "n/a" if mx is None else f"{mx:.3f}",
                "n/a" if mn is None else f"{mn:.3f}",
                f"{counted[name][0]:.3f}",
                f"{counted[name][1]:.3f}",
                verdict,
            ]
        )
    print_table(
        f"2. balance at N={n}: key share relative to the mean",
        ["ring", "max/mean exact", "min/mean exact", "max/mean keys", "min/mean keys", "goal"],
        rows,
        [
            "exact: shardcache from Ring.share(); uhashring from its get_points() arcs",
            "(2^128 md5 space for its default ring, 2^32 for ketama).",
            f"keys: counted over {len(keys):,} keys ({len(keys) // n:,} per node on average; sampling noise",
            "alone moves max/min by a few %).",
            "rendezvous keys counted with a C-mmh3 stand-in of its formula; identical to RendezvousHash",
            f"on {len(sample):,} keys: {'yes' if standin_ok else 'NO'}.",
        ],
    )
    return {
        "n": n,
        "exact": {k: {"max_over_mean": v[0], "min_over_mean": v[1]} for k, v in exact.items()},
        "keys": {k: {"max_over_mean": v[0], "min_over_mean": v[1]} for k, v in counted.items()},
        "keys_counted": len(keys),
        "rendezvous_standin_identical": standin_ok,
    }


# -- 3. movement -------------------------------------------------------------------------------------


def count_moves(before: list[str], after: list[str], new_node: str) -> tuple[float, float]:
    """(fraction of keys whose node changed, fraction of those that went to ``new_node``)."""
    moved = [b for a, b in zip(before, after, strict=True) if a != b]
    onto_new = sum(1 for b in moved if b == new_node) / len(moved) if moved else 1.0
    return len(moved) / len(before), onto_new


def bench_movement(keys: list[str], goals: list[dict[str, Any]]) -> dict[str, Any]:
    rows, data = [], []
    for n in (3, 10, 50, 100):
        nodes = node_names(n + 1)
        small, new = nodes[:n], nodes[n]
        ideal = 1 / (n + 1)
        for name in (MMH3, KETAMA, UH_DEFAULT, UH_KETAMA):
            build = BUILDERS[name]
            a, b = build(small), build(nodes)
            moved_keys, onto_keys = count_moves(assign(lookup_of(a), keys), assign(lookup_of(b), keys), new)
            moved_exact = onto_exact = None
            if isinstance(a, Ring):
                diff = a.diff(b)
                moved_exact, onto_exact = diff.moved, diff.moved_to(new) / diff.moved
            measured = [m for m in (moved_exact, moved_keys) if m is not None]
            onto = [o for o in (onto_exact, onto_keys) if o is not None]
            ok = all(abs(m - ideal) / ideal <= 0.10 for m in measured) and all(o >= 1 - 1e-9 for o in onto)
            if isinstance(a, Ring):
                goals.append({"goal": f"{name} movement N={n}→{n + 1}", "value": moved_exact, "pass": ok})
            data.append(
                {
                    "ring": name,
                    "n": n,
                    "ideal": ideal,
                    "moved_exact": moved_exact,
                    "moved_keys": moved_keys,
                    "onto_new_exact": onto_exact,
                    "onto_new_keys": onto_keys,
                    "pass": ok,
                }
            )
            rows.append(
                [
                    name,
                    n,
                    f"{ideal:.4f}",
                    "n/a" if moved_exact is None else f"{moved_exact:.4f}",
                    "n/a" if moved_exact is None else f"{(moved_exact - ideal) / ideal * 100:+.1f}%",
                    f"{moved_keys:.4f}",
                    f"{(moved_keys - ideal) / ideal * 100:+.1f}%",
                    "n/a" if onto_exact is None else f"{onto_exact * 100:.1f}%",
                    f"{onto_keys * 100:.1f}%",
                    goal(ok),
                ]
            )
    print_table(
        "3. keys moved when node N+1 is added",
        [
            "ring",
            "N",
            "1/(N+1)",
            "moved exact",
            "err",
            "moved keys",
            "err",
            "onto new exact",
            "onto new keys",
            "goal",
        ],
        rows,
        [
            "exact: Ring.diff(bigger) over the whole hash space; keys: counted over "
            f"{len(keys):,} keys with both rings.",
            "goal: every measure within 10% of 1/(N+1) and 100% of moved keys onto the new node",
            "(a goal for shardcache; peers shown for comparison). Ketama mode reproduces libmemcached's",
            "KETAMA_WEIGHTED float32 points-per-server formula, which gives 156 instead of 160 points",
            "per server at some N (50 and 100 among them): adding a node there reshuffles old nodes too.",
        ],
    )
    return {"added_node": data, "weighted_removal": bench_weighted_removal(keys, goals)}


def bench_weighted_removal(keys: list[str], goals: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = node_names(10)
    weights = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    weighted = dict(zip(nodes, weights, strict=True))
    specs = [f"{node}:{w}" for node, w in weighted.items()]
    rings = {
        MMH3: Ring(specs),
        KETAMA: Ring(specs, hashing="ketama"),
        UH_DEFAULT: HashRing(weighted),
        UH_KETAMA: HashRing(weighted, hash_fn="ketama"),
    }
    before = {name: assign(lookup_of(ring), keys) for name, ring in rings.items()}
    rows, data = [], []
    for removed in nodes[:3]:  # one node of each weight
        kept = {node: w for node, w in weighted.items() if node != removed}
        smaller = {
            MMH3: rings[MMH3].without_node(removed),
            KETAMA: rings[KETAMA].without_node(removed),
            UH_DEFAULT: HashRing(kept),
            UH_KETAMA: HashRing(kept, hash_fn="ketama"),
        }
        for name, a in rings.items():
            b = smaller[name]
            after = assign(lookup_of(b), keys)
            pairs = list(zip(before[name], after, strict=True))
            moved_keys = sum(x != y for x, y in pairs) / len(keys)
            between_keys = sum(x not in (y, removed) for x, y in pairs) / len(keys)
            moved_exact = between_exact = None
            if isinstance(a, Ring):
                diff = a.diff(b)
                moved_exact = diff.moved
                between_exact = sum(v for (src, _), v in diff.flows.items() if src != removed)
            verdict = ""
            if name == MMH3:
                ok = between_keys == 0 and between_exact == 0
                label = f"{MMH3} removing a weight-{weighted[removed]} node: 0 keys between untouched nodes"
                goals.append({"goal": label, "value": between_exact, "pass": ok})
                verdict = f"{goal(ok)} (= 0)"
            data.append(
                {
                    "ring": name,
                    "removed": removed,
                    "removed_weight": weighted[removed],
                    "moved_exact": moved_exact,
                    "between_untouched_exact": between_exact,
                    "moved_keys": moved_keys,
                    "between_untouched_keys": between_keys,
                }
            )
            rows.append(
                [
                    name,
                    weighted[removed],
                    "n/a" if moved_exact is None else f"{moved_exact * 100:.2f}%",
                    f"{moved_keys * 100:.2f}%",
                    "n/a" if between_exact is None else f"{between_exact * 100:.2f}%",
                    f"{between_keys * 100:.2f}%",
                    verdict,
                ]
            )
    print_table(
        f"3b. removing one node of 10 weighted nodes (weights {weights})",
        ["ring", "removed weight", "moved exact", "moved keys", "between exact", "between keys", "goal"],
        rows,
        [
            "moved: % of all keys whose node changes; between: % of all keys that move from one remaining",
            "node to another (ideal 0: only the removed node's keys move). Removed: the first node of",
            f"weight 1, 2 and 3 in turn; exact from Ring.diff(), keys counted over {len(keys):,} keys.",
        ],
    )
    return {"weights": weights, "removals": data}


# -- 4. build time and memory ------------------------------------------------------------------------


def traced_build(build: Callable[[Any], Any], nodes: list[str]) -> tuple[float, float]:
    """(peak, retained) bytes allocated while building one ring, per ``tracemalloc``."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        ring = build(nodes)
        peak = tracemalloc.get_traced_memory()[1]
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del ring
    return peak - base, retained - base


def bench_build(s: Settings, goals: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = node_names(s.big)
    names = (MMH3, KETAMA, UH_DEFAULT, UH_KETAMA)
    builds = {name: (lambda build=BUILDERS[name]: build(nodes)) for name in names}
    stats = measure_interleaved(builds, s.build_rounds, warmup=0, clock=s.clock)
    memory = {name: traced_build(BUILDERS[name], nodes) for name in names}
    mib = 1 << 20
    rows = []
    for name in names:
        st = stats[name]
        verdict = ""
        if name == MMH3 and s.big == 1000:
            ok = st.median <= 0.5
            goals.append({"goal": f"{MMH3} 1000-node build ≤ 0.5 s", "value": st.median, "pass": ok})
            verdict = f"{goal(ok)} (≤ 0.5 s)"
        peak, retained = memory[name]
        rows.append(
            [
                name,
                f"{st.median:.3f}",
                f"{st.min:.3f}",
                f"{st.max:.3f}",
                f"{peak / mib:.1f}",
                f"{retained / mib:.1f}",
                verdict,
            ]
        )
    print_table(
        f"4. building a {s.big}-node ring ({s.build_rounds} rounds)",
        ["ring", "median s", "min s", "max s", "peak MiB", "retained MiB", "goal"],
        rows,
        ["memory: tracemalloc over one more (untimed) build: peak during it, and retained by the ring."],
    )
    return {
        "nodes": s.big,
        "timings": stats,
        "memory_bytes": {k: {"peak": v[0], "retained": v[1]} for k, v in memory.items()},
    }


# -- 5. ring swap ------------------------------------------------------------------------------------


def bench_swap(s: Settings) -> dict[str, Any]:
    nodes = node_names(s.big + 1)
    base, new, gone = nodes[:-1], nodes[-1], nodes[s.big // 2]
    mmh3_ring, ketama_ring = Ring(base), Ring(base, hashing="ketama")
    uh_default = HashRing(base)
    # uhashring mutates in place. measure_interleaved calls these in dict order each round (and there
    # is no warm-up), so each add_node is followed by its remove_node and the ring size stays put.
    ops: dict[str, Callable[[], object]] = {
        f"{MMH3}|with_node": lambda: mmh3_ring.with_node(new),
        f"{MMH3}|without_node": lambda: mmh3_ring.without_node(gone),
        f"{KETAMA}|with_node": lambda: ketama_ring.with_node(new),
        f"{KETAMA}|without_node": lambda: ketama_ring.without_node(gone),
        f"{UH_DEFAULT}|add_node": lambda: uh_default.add_node(new),
        f"{UH_DEFAULT}|remove_node": lambda: uh_default.remove_node(new),
    }
    stats = measure_interleaved(ops, s.build_rounds, warmup=0, clock=s.clock)
    rows = [
        [name, f"{stats[f'{name}|{add}'].median:.3f}", f"{stats[f'{name}|{remove}'].median:.3f}"]
        for name, add, remove in (
            (MMH3, "with_node", "without_node"),
            (KETAMA, "with_node", "without_node"),
            (UH_DEFAULT, "add_node", "remove_node"),
        )
    ]
    print_table(
        f"5. adding / removing one node of a {s.big}-node ring ({s.build_rounds} rounds, median s)",
        ["ring", "add a node", "remove a node"],
        rows,
        [
            "shardcache: ring.with_node(...) / ring.without_node(...) build a new immutable ring;",
            "uhashring default: add_node / remove_node mutate the ring in place (shown for comparison);",
            "uhashring ketama rebuilds its whole ring on either (see its build time in section 4).",
        ],
    )
    return {"nodes": s.big, "timings": stats}


# -- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ring_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, --quick 2)")
    parser.add_argument(
        "--quick", action="store_true", help="a ~20 s smoke run: fewer keys and rounds, 100-node builds"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU time (time.process_time) instead of wall time: steadier "
        "on a shared machine, blind to time spent descheduled",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    s = settings(args.quick, args.rounds, args.cpu_time)
    started = time.perf_counter()
    env = environment(["shardcache", "uhashring", "pymemcache", "mmh3"])
    print_header("shardcache ring benchmarks", env)
    print(
        f"settings  {s.keys:,} keys, {s.rounds} rounds for lookups; {s.big}-node builds and swaps, "
        f"{s.build_rounds} rounds; rendezvous keys per N {s.rendezvous_keys}"
    )
    print(
        "timing    "
        + ("CPU time of this process (time.process_time)" if s.cpu_time else "wall time (time.perf_counter)")
        + "; medians over rounds, round-robin across rings\n"
    )

    keys = key_names(s.keys)
    goals: list[dict[str, Any]] = []
    results: dict[str, Any] = {"environment": env, "settings": vars(s) | {"clock": s.clock.__name__}}
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("lookups", lambda: bench_lookups(s, keys, goals)),
        ("balance", lambda: bench_balance(keys, goals)),
        ("movement", lambda: bench_movement(keys, goals)),
        ("build", lambda: bench_build(s, goals)),
        ("swap", lambda: bench_swap(s)),
    ]
    section_s = {}
    for name, run in sections:
        t0 = time.perf_counter()
        results[name] = run()
        section_s[name] = round(time.perf_counter() - t0, 1)
    results["goals"] = goals
    results["section_s"] = section_s

    misses = [g["goal"] for g in goals if not g["pass"]]
    print(f"goals: {len(goals) - len(misses)}/{len(goals)} PASS")
    for miss in misses:
        print(f"  MISS  {miss}")
    elapsed = time.perf_counter() - started
    results["elapsed_s"] = elapsed
    print(f"elapsed {elapsed:.0f} s (per section: {section_s})")
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
