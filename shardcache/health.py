"""Per-node health: an explicit state machine driven by transport failures, with jittered backoff.

States and transitions::

            failure_threshold consecutive failures
      UP  ───────────────────────────────────────▶  DOWN
      ▲                                              │  ▲
      │ probe answered:                   backoff    │  │ probe failed:
      │ readmitted at once                elapsed    ▼  │ backoff doubles (capped), jittered
      └───────────────────────────────────────────  PROBING

Readmission comes first, fencing after: once a probe is answered the node is UP again and takes
writes at once (so stand-ins stop collecting new copies), but it is not *ready* until the prober
has deleted the keys written elsewhere while it was away (its fence log, or a flush past
``fence_max_keys``) and the stand-ins' copies: until then a read of a fenced key misses and a
pinned call (counter, CAS, lock) on one raises. See ``shardcache._prober`` and
``shardcache._topology.Node.ready``.

A DOWN node costs requests no time: the client routes its keys by the failover policy at once. Only
the prober (one background thread per client) probes a node, so no request ever waits on a probe.
The clock is injected (``time.monotonic`` by default) so tests drive time without sleeping.

``NodeHealth`` is thread-safe: transitions happen under a lock; ``state`` is a plain attribute read
without one (a request may see a transition a moment late, which is harmless).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shardcache.errors import ConfigurationError

__all__ = ["DOWN", "PROBING", "UP", "Clock", "Event", "HealthPolicy", "NodeHealth"]

UP = "up"
DOWN = "down"
PROBING = "probing"


class Clock(Protocol):
    """A monotonic clock in seconds (``time.monotonic``)."""

    def __call__(self) -> float: ...


@dataclass(frozen=True)
class Event:
    """Something that happened to a node, as delivered to ``Client.add_listener`` callbacks.

    ``kind`` is one of nine: ``"node_down"``, ``"node_up"``, ``"failover"`` (its keys now go to a
    stand-in), ``"error"`` (a failed or refused call; ``error`` and ``key`` say which), ``"fenced"``
    (a readmitted node forgot the keys written elsewhere meanwhile), ``"node_added"``,
    ``"node_removed"`` (membership changes; ``detail`` names the warm-up or drain window),
    ``"discovery_failed"`` (the discovery callable failed or returned nothing; the last good list
    stays) and ``"rebalanced"`` (``Client.rebalance`` is done with a node; ``detail`` counts its
    strays).
    """

    kind: str
    node_id: str
    detail: str = ""
    error: BaseException | None = field(default=None, compare=False)
    key: object = None


@dataclass(frozen=True)
class HealthPolicy:
    """When a node is declared down and how soon it is probed again. Immutable.

    ``failure_threshold`` consecutive transport failures (errors or timeouts) mark a node DOWN;
    the first probe comes ``retry_interval_s`` later, and each failed probe doubles the wait up to
    ``max_retry_interval_s``; every wait is jittered by ±``jitter`` (a fraction) so that many clients
    do not probe a recovering node in lockstep.
    """

    failure_threshold: int = 2
    retry_interval_s: float = 1.0
    max_retry_interval_s: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.failure_threshold, bool) or not isinstance(self.failure_threshold, int):
            raise ConfigurationError(f"failure_threshold={self.failure_threshold!r}: expected an int >= 1")
        if self.failure_threshold < 1:
            raise ConfigurationError(f"failure_threshold={self.failure_threshold!r}: expected an int >= 1")
        for name in ("retry_interval_s", "max_retry_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"{name}={value!r}: expected seconds > 0")
        if self.max_retry_interval_s < self.retry_interval_s:
            raise ConfigurationError(
                f"max_retry_interval_s={self.max_retry_interval_s!r}: must be >= retry_interval_s"
            )
        if (
            isinstance(self.jitter, bool)
            or not isinstance(self.jitter, int | float)
            or not 0 <= self.jitter < 1
        ):
            raise ConfigurationError(f"jitter={self.jitter!r}: expected a fraction in [0, 1)")


class NodeHealth:
    """The health state machine of one node; thread-safe.

    ``on_change(old, new, reason)`` is called (outside the lock) after every transition.
    """

    __slots__ = (
        "_backoff",
        "_clock",
        "_lock",
        "_on_change",
        "_random",
        "_up_since",
        "failures",
        "next_probe_at",
        "node_id",
        "policy",
        "state",
        "state_changes",
    )

    def __init__(
        self,
        node_id: str,
        policy: HealthPolicy,
        *,
        clock: Clock = time.monotonic,
        on_change: Callable[[str, str, str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.policy = policy
        self.state = UP
        self.failures = 0
        self.state_changes = 0
        self.next_probe_at = 0.0
        self._backoff = policy.retry_interval_s
        self._up_since = float("-inf")  # when it was last readmitted
        self._clock = clock
        self._lock = threading.Lock()
        self._on_change = on_change
        self._random = rng or random.Random()

    def _jittered(self, seconds: float) -> float:
        spread = self.policy.jitter
        return seconds * (1 + self._random.uniform(-spread, spread)) if spread else seconds

    def record_success(self) -> None:
        """A call to the node worked: consecutive failures start again from zero."""
        if self.failures:
            with self._lock:
                self.failures = 0

    def record_failure(self, reason: str = "") -> bool:
        """A call failed at the transport level. True if this failure marked the node DOWN."""
        with self._lock:
            if self.state != UP:
                return False
            self.failures += 1
            if self.failures < self.policy.failure_threshold:
                return False
            now = self._clock()
            if now - self._up_since >= self.policy.max_retry_interval_s:
                self._backoff = self.policy.retry_interval_s  # it was stable: start over
            else:  # readmitted, then failed again soon: answers probes but not calls; keep backing off
                self._backoff = min(self._backoff * 2, self.policy.max_retry_interval_s)
            self.next_probe_at = now + self._jittered(self._backoff)
            old = self.state
            self.state = DOWN
            self.state_changes += 1
        if self._on_change is not None:
            self._on_change(old, DOWN, reason)
        return True

    def force_down(self, reason: str) -> bool:
        """UP -> DOWN because another process saw the node fail (its outage mark): no failure is
        counted here, and the first probe waits ``retry_interval_s`` (jittered). True if it was UP."""
        with self._lock:
            if self.state != UP:
                return False
            self.failures = 0
            self.next_probe_at = self._clock() + self._jittered(self.policy.retry_interval_s)
            self.state = DOWN
            self.state_changes += 1
        if self._on_change is not None:
            self._on_change(UP, DOWN, reason)
        return True

    def probe_soon(self) -> None:
        """DOWN: probe now (the node was flushed and marked clean by another process)."""
        with self._lock:
            if self.state == DOWN:
                self.next_probe_at = self._clock()

    def probe_later(self, seconds: float, reason: str) -> None:
        """PROBING -> DOWN after a probe that answered, when the node may not be readmitted yet (it
        is returning from an outage other processes saw): probe again in ``seconds``, no backoff."""
        with self._lock:
            if self.state != PROBING:
                return
            self.next_probe_at = self._clock() + seconds
            self.state = DOWN
            self.state_changes += 1
        if self._on_change is not None:
            self._on_change(PROBING, DOWN, reason)

    def probe_due(self) -> bool:
        """True if the node is DOWN and its backoff has elapsed."""
        return self.state == DOWN and self._clock() >= self.next_probe_at

    def begin_probe(self) -> bool:
        """DOWN -> PROBING if the backoff has elapsed. True if the caller now owns the probe."""
        with self._lock:
            if self.state != DOWN or self._clock() < self.next_probe_at:
                return False
            self.state = PROBING
            self.state_changes += 1
        if self._on_change is not None:
            self._on_change(DOWN, PROBING, "probe due")
        return True

    def probe_failed(self, reason: str) -> None:
        """PROBING -> DOWN; the next probe waits twice as long (up to the cap), jittered."""
        with self._lock:
            if self.state != PROBING:
                return
            self._backoff = min(self._backoff * 2, self.policy.max_retry_interval_s)
            self.next_probe_at = self._clock() + self._jittered(self._backoff)
            self.state = DOWN
            self.state_changes += 1
        if self._on_change is not None:
            self._on_change(PROBING, DOWN, reason)

    def readmit(self) -> None:
        """PROBING -> UP: the node answered the probe (fencing follows; see the prober). The backoff
        is kept: if the node fails again within ``max_retry_interval_s``, the next wait doubles
        rather than starting over, so a node that answers probes but fails real calls is not
        readmitted every ``retry_interval_s`` forever (callers would pay its timeouts each time)."""
        with self._lock:
            if self.state != PROBING:
                return
            self.failures = 0
            self._up_since = self._clock()  # the backoff starts over only once it has stayed up
            self.state = UP
            self.state_changes += 1
        if self._on_change is not None:
            self._on_change(PROBING, UP, "probe answered; its changed keys miss until fenced")

    def seconds_until_probe(self) -> float | None:
        """How long until a probe is due (0 if due now), or None if the node is not DOWN."""
        if self.state != DOWN:
            return None
        return max(0.0, self.next_probe_at - self._clock())
