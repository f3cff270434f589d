"""Django's own memcached cache test case, run against ShardCache on the session cluster.

The tests come from Django's source distribution for the installed Django version (fetched by
django_tests_source.py into a cache directory outside the repository; a failed download fails
these tests, it never skips them). run_cache_tests.py runs them in a child process, because Django
settings can be configured only once per process and they must name the cluster before Django's
test module is imported. Both classes must pass: Django's unmodified ``PyMemcacheCacheTests`` on
PyMemcacheCache (the baseline) and ``ShardCacheTests`` on ShardCache.

The only tests allowed to skip are the ones Django itself skips for every memcached backend: the
culling tests (``MAX_ENTRIES``/``CULL_FREQUENCY`` are options of the local-memory, file and
database caches; memcached evicts by itself, so Django's memcached settings exclude the "cull"
caches and the tests skip with "Culling isn't implemented.").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django_tests_source import DjangoTestsUnavailableError, django_version, ensure_django_tests

from shardcache.testing import LocalCluster

_HERE = Path(__file__).resolve().parent
_RUNNER = _HERE / "run_cache_tests.py"
_RUN_TIMEOUT_S = 600
_DJANGO_SKIPS = {
    "test_cull": "Culling isn't implemented.",
    "test_zero_cull": "Culling isn't implemented.",
    "test_cull_delete_when_store_empty": "Culling isn't implemented.",
}
pytestmark = pytest.mark.timeout(_RUN_TIMEOUT_S + 120)


@pytest.fixture(scope="module")
def django_tests_dir() -> Path:
    try:
        return ensure_django_tests()
    except DjangoTestsUnavailableError as exc:
        pytest.fail(f"Django's test suite (sdist of django=={django_version()}) is unavailable: {exc}")


@pytest.fixture(scope="module")
def suite_report(
    cluster: LocalCluster, django_tests_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    report = tmp_path_factory.mktemp("django-suite") / "report.json"
    command = [
        sys.executable, str(_RUNNER), "--tests-dir", str(django_tests_dir),
        "--servers", ",".join(cluster.specs), "--report", str(report),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:  # subprocess.run kills the child by its PID
        pytest.fail(f"Django's cache tests did not finish within {_RUN_TIMEOUT_S} s: {exc}")
    if not report.is_file():
        pytest.fail(
            f"the Django suite runner wrote no report (exit {done.returncode}):\n{done.stderr[-5000:]}"
        )
    result: dict[str, Any] = json.loads(report.read_text())
    result["stderr"] = done.stderr
    result["returncode"] = done.returncode
    return result


def _summary(tests: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    by_outcome: dict[str, list[str]] = {}
    for test_id, outcome in sorted(tests.items()):
        by_outcome.setdefault(outcome["outcome"], []).append(test_id.rsplit(".", 1)[1])
    return by_outcome


def _check_class(report: dict[str, Any], name: str) -> dict[str, list[str]]:
    tests: dict[str, dict[str, Any]] = report["classes"][name]["tests"]
    problems = {
        test_id: outcome
        for test_id, outcome in tests.items()
        if outcome["outcome"] not in ("passed", "skipped")
        or (
            outcome["outcome"] == "skipped"
            and _DJANGO_SKIPS.get(test_id.rsplit(".", 1)[1]) != outcome["detail"]
        )
    }
    assert not problems, "\n\n".join(
        f"{test_id}: {outcome['outcome']}\n{outcome['detail']}" for test_id, outcome in problems.items()
    )
    return _summary(tests)


def test_django_pymemcache_baseline_passes(suite_report: dict[str, Any]) -> None:
    summary = _check_class(suite_report, "pymemcache")
    assert summary.get("skipped") == sorted(_DJANGO_SKIPS)
    assert len(summary["passed"]) >= 50


def test_django_memcached_suite_passes_on_shardcache(suite_report: dict[str, Any]) -> None:
    summary = _check_class(suite_report, "shardcache")
    assert summary.get("skipped") == sorted(_DJANGO_SKIPS)
    assert len(summary["passed"]) >= 50
    assert suite_report["returncode"] == 0, suite_report["stderr"][-5000:]


def test_shardcache_runs_every_test_of_djangos_class(suite_report: dict[str, Any]) -> None:
    ours = {t.rsplit(".", 1)[1] for t in suite_report["classes"]["shardcache"]["tests"]}
    django = {t.rsplit(".", 1)[1] for t in suite_report["classes"]["pymemcache"]["tests"]}
    assert ours == django
