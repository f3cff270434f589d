"""The node health state machine, driven by a fake clock: no sleeping, no sockets."""

import random
import threading

import pytest

from shardcache import ConfigurationError
from shardcache.health import DOWN, PROBING, UP, HealthPolicy, NodeHealth


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(policy: HealthPolicy | None = None) -> tuple[NodeHealth, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    health = NodeHealth(
        "a:1",
        policy or HealthPolicy(failure_threshold=2, retry_interval_s=1.0, max_retry_interval_s=8.0, jitter=0),
        clock=clock,
        on_change=lambda old, new, why: changes.append((old, new)),
        rng=random.Random(7),
    )
    return health, clock, changes


def test_consecutive_failures_reach_the_threshold_and_mark_down() -> None:
    health, _, changes = make()
    assert health.record_failure() is False
    assert health.state == UP
    assert health.record_failure() is True
    assert health.state == DOWN and changes == [(UP, DOWN)]
    assert health.record_failure() is False  # already down: no second transition


def test_a_success_resets_the_consecutive_count() -> None:
    health, _, _ = make()
    health.record_failure()
    health.record_success()
    health.record_failure()
    assert health.state == UP


def test_no_probe_before_the_retry_interval_then_exactly_one_prober() -> None:
    health, clock, _ = make()
    health.record_failure()
    health.record_failure()
    assert health.seconds_until_probe() == pytest.approx(1.0)
    assert not health.probe_due() and not health.begin_probe()
    clock.now += 1.0
    assert health.probe_due()
    assert health.begin_probe() is True
    assert health.state == PROBING
    assert health.begin_probe() is False  # another caller does not get the probe


def test_failed_probes_back_off_exponentially_up_to_the_cap() -> None:
    health, clock, _ = make()
    health.record_failure()
    health.record_failure()
    waits = []
    for _ in range(6):
        clock.now = health.next_probe_at
        assert health.begin_probe()
        health.probe_failed("still down")
        waits.append(health.next_probe_at - clock.now)
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


def test_readmission_resets_backoff_and_failures() -> None:
    health, clock, changes = make()
    health.record_failure()
    health.record_failure()
    clock.now += 1
    health.begin_probe()
    health.probe_failed("x")
    clock.now = health.next_probe_at
    health.begin_probe()
    health.readmit()
    assert health.state == UP and health.failures == 0
    assert changes == [(UP, DOWN), (DOWN, PROBING), (PROBING, DOWN), (DOWN, PROBING), (PROBING, UP)]
    clock.now += health.policy.max_retry_interval_s  # stable for long enough
    health.record_failure()
    health.record_failure()
    assert health.next_probe_at - clock.now == pytest.approx(1.0)  # backoff starts over
    assert health.state_changes == 6


def test_a_node_that_fails_soon_after_readmission_keeps_backing_off() -> None:
    """It answers probes (version) but fails real calls: without this it would be readmitted every
    retry_interval_s forever, and callers would pay failure_threshold timeouts each time."""
    health, clock, _ = make()
    waits = []
    for _ in range(6):
        health.record_failure()
        health.record_failure()
        waits.append(round(health.next_probe_at - clock.now, 6))
        clock.now = health.next_probe_at
        assert health.begin_probe()
        health.readmit()
        clock.now += 0.1  # the next real calls fail at once
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    clock.now += health.policy.max_retry_interval_s
    health.record_failure()
    health.record_failure()
    assert health.next_probe_at - clock.now == pytest.approx(1.0)


def test_jitter_spreads_probes_within_bounds() -> None:
    waits = set()
    for seed in range(30):
        clock = FakeClock()
        health = NodeHealth(
            "a:1",
            HealthPolicy(failure_threshold=1, retry_interval_s=10.0, jitter=0.2),
            clock=clock,
            rng=random.Random(seed),
        )
        health.record_failure()
        wait = health.next_probe_at - clock.now
        assert 8.0 <= wait <= 12.0
        waits.add(round(wait, 3))
    assert len(waits) > 20


def test_readmit_and_probe_failed_only_act_while_probing() -> None:
    health, _, changes = make()
    health.readmit()
    health.probe_failed("x")
    assert health.state == UP and changes == []


def test_concurrent_failures_mark_down_exactly_once() -> None:
    health, _, changes = make(HealthPolicy(failure_threshold=50, jitter=0))
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(100):
            health.record_failure()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert changes == [(UP, DOWN)]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"failure_threshold": 0}, "failure_threshold=0"),
        ({"failure_threshold": 1.5}, "failure_threshold=1.5"),
        ({"retry_interval_s": -1}, "retry_interval_s=-1"),
        ({"retry_interval_s": 0}, "retry_interval_s=0"),
        ({"retry_interval_s": 5, "max_retry_interval_s": 1}, "max_retry_interval_s=1"),
        ({"jitter": 1.0}, "jitter=1.0"),
    ],
)
def test_bad_policies_raise_naming_the_option(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment.replace(".", r"\.")):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]
