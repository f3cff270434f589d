"""Run Django's own memcached cache test case against shardcache's Django backend, on real nodes.

    python integration/django_suite/run_cache_tests.py --tests-dir DIR --servers a:1,b:2,c:3 \\
        --report report.json [--only shardcache|pymemcache]

``DIR`` is the ``tests`` directory of Django's source distribution (see django_tests_source.py);
its ``cache`` app (``tests/cache/tests.py``, ``models.py``) is imported as Django's own
``tests/runtests.py`` imports it: ``DIR`` on ``sys.path``, ``cache`` in INSTALLED_APPS. Settings
are configured here, then Django's test machinery runs the tests: ``DiscoverRunner`` sets up the
test environment and the SQLite test database (some tests cache ``Poll`` model instances), and
``unittest`` runs the classes. Two classes run, both over every node in ``--servers``:

- ``PyMemcacheCacheTests``: Django's class, unmodified, on Django's ``PyMemcacheCache`` (pymemcache's
  ``HashClient``): the baseline, proving the harness and the servers.
- ``ShardCacheTests``: a subclass of it whose CACHES point at ``shardcache.contrib.django.ShardCache``.
  Every inherited test (``BaseCacheTests`` + ``BaseMemcachedTests``) runs as Django wrote it, except
  the four that reach into pymemcache itself; those are replaced by equivalents (see the class).

The report is JSON: for each class, every test id with its outcome (``passed``, ``failed``,
``error``, ``skipped``) and the skip reason or traceback. The exit status is 0 only if nothing failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import unittest
from pathlib import Path
from typing import Any

SHARDCACHE_BACKEND = "shardcache.contrib.django.ShardCache"
PYMEMCACHE_BACKEND = "django.core.cache.backends.memcached.PyMemcacheCache"


def configure(tests_dir: Path, servers: list[str]) -> None:
    sys.path.insert(0, str(tests_dir))
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="django_tests_secret_key",
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "cache"],
        # cache/tests.py picks the memcached test settings by BACKEND from here, at import time.
        CACHES={
            "default": {"BACKEND": SHARDCACHE_BACKEND, "LOCATION": servers},
            "pymemcache": {"BACKEND": PYMEMCACHE_BACKEND, "LOCATION": servers},
        },
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        USE_TZ=False,
        MIDDLEWARE=[],
    )
    django.setup()


def make_shardcache_class() -> type[unittest.TestCase]:
    """Django's ``PyMemcacheCacheTests`` with its CACHES pointed at ShardCache."""
    import pickle
    from unittest import mock

    from cache.tests import (  # type: ignore[import-not-found]
        PyMemcacheCacheTests,
        caches_setting_for_tests,
        configured_caches,
        memcached_excluded_caches,
    )
    from django.conf import settings
    from django.core import signals
    from django.core.cache import cache, caches
    from django.db import close_old_connections
    from django.test import override_settings
    from pymemcache.client.base import Client as PymemcacheClient

    import shardcache

    params = configured_caches[SHARDCACHE_BACKEND]

    def raw_get(alias: str, key: str) -> bytes | None:
        """The stored bytes of a Django cache key, read from its node by a plain pymemcache client."""
        backend = caches[alias]
        wire = backend.make_and_validate_key(key)
        host, port = backend.client.node_for(wire).rsplit(":", 1)
        reader = PymemcacheClient((host, int(port)), allow_unicode_keys=True, connect_timeout=2, timeout=2)
        try:
            value: bytes | None = reader.get(wire)
        finally:
            reader.close()
        return value

    @override_settings(CACHES=caches_setting_for_tests(base=params, exclude=memcached_excluded_caches))
    class ShardCacheTests(PyMemcacheCacheTests):  # type: ignore[misc, valid-type]
        """Django's memcached test case on ShardCache. Replaced, with the reason:

        - ``test_close``: Django patches the client's ``disconnect_all`` (pymemcache's name) and
          checks ``request_finished`` calls it when ``should_disconnect_on_close``. ShardCache keeps
          its connections (False, as for PyLibMCCache); the same check on ``shardcache.Client.close``.
        - ``test_set_many_returns_failing_keys``: Django patches pymemcache's ``set_multi``; the same
          test on ``shardcache.Client.set_many``.
        - ``test_pymemcache_highest_pickle_version``: Django reads pymemcache ``HashClient``
          internals (``default_kwargs``, ``clients``); here the bytes each configured cache stores
          are read back from their node and checked to be a pickle of the highest protocol.
        - ``test_pymemcache_options``: Django checks ``HashClient.default_kwargs``; here OPTIONS
          (``no_delay`` and ``key_prefix``) are checked to reach the client: the item lands on its
          node under the prefixed key.

        ``incr_decr_type_error`` is ``shardcache.CommandError`` (a pymemcache ``MemcacheClientError``);
        Django looks it up as ``cache._lib.exceptions.MemcacheClientError``, a pymemcache module path.
        """

        base_params = params
        should_disconnect_on_close = False

        @property
        def incr_decr_type_error(self) -> type[Exception]:
            return shardcache.CommandError

        def test_close(self) -> None:
            signals.request_finished.disconnect(close_old_connections)
            try:
                with mock.patch.object(cache._class, "close", autospec=True) as mock_close:
                    signals.request_finished.send(self.__class__)
                    self.assertIs(mock_close.called, self.should_disconnect_on_close)
            finally:
                signals.request_finished.connect(close_old_connections)

        def test_set_many_returns_failing_keys(self) -> None:
            def fail_set_many(mapping: Any, *args: Any, **kwargs: Any) -> Any:
                return mapping.keys()

            with mock.patch.object(cache._class, "set_many", side_effect=fail_set_many):
                failing_keys = cache.set_many({"key": "value"})
                self.assertEqual(failing_keys, ["key"])

        def test_pymemcache_highest_pickle_version(self) -> None:
            for alias in settings.CACHES:
                with self.subTest(cache_key=alias):
                    caches[alias].set("pickled", {"a": [1, 2]})
                    raw = raw_get(alias, "pickled")
                    self.assertIsNotNone(raw)
                    assert raw is not None
                    self.assertEqual(raw[:2], bytes([0x80, pickle.HIGHEST_PROTOCOL]))
                    self.assertEqual(pickle.loads(raw), {"a": [1, 2]})

        @override_settings(
            CACHES=caches_setting_for_tests(
                base=params,
                exclude=memcached_excluded_caches,
                OPTIONS={"no_delay": True, "key_prefix": "opt:"},
            )
        )
        def test_pymemcache_options(self) -> None:
            self.assertEqual(cache._options["no_delay"], True)
            cache.set("optioned", "value")
            wire = cache.make_and_validate_key("optioned")
            host, port = cache.client.node_for(wire).rsplit(":", 1)
            reader = PymemcacheClient((host, int(port)), connect_timeout=2, timeout=2)
            try:
                self.assertEqual(reader.get("opt:" + wire), b"value")
                self.assertIsNone(reader.get(wire))
            finally:
                reader.close()

    return ShardCacheTests


class RecordingResult(unittest.TextTestResult):
    """A text result that also records every test's outcome (subtest failures fail their test)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, dict[str, Any]] = {}

    def _record(self, test: unittest.TestCase, outcome: str, detail: str = "") -> None:
        previous = self.outcomes.get(test.id())
        if previous is not None and previous["outcome"] in ("failed", "error"):
            return  # a failed subtest already decided it
        self.outcomes[test.id()] = {"outcome": outcome, "detail": detail}

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802 - unittest's API
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:  # noqa: N802 - unittest's API
        super().addFailure(test, err)
        self._record(test, "failed", "".join(traceback.format_exception(*err)))

    def addError(self, test: unittest.TestCase, err: Any) -> None:  # noqa: N802 - unittest's API
        super().addError(test, err)
        self._record(test, "error", "".join(traceback.format_exception(*err)))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802 - unittest's API
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:  # noqa: N802 - unittest's API
        super().addExpectedFailure(test, err)
        self._record(test, "expected failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802 - unittest's API
        super().addUnexpectedSuccess(test)
        self._record(test, "failed", "unexpected success")

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: Any) -> None:  # noqa: N802 - unittest's API
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self.outcomes[test.id()] = {
                "outcome": "failed" if failed else "error",
                "detail": f"{subtest.id()}\n" + "".join(traceback.format_exception(*err)),
            }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests-dir", type=Path, required=True)
    parser.add_argument("--servers", required=True, help="comma-separated host:port list")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--only", choices=("shardcache", "pymemcache"))
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]

    configure(args.tests_dir, servers)
    from cache.tests import PyMemcacheCacheTests
    from django.test.runner import DiscoverRunner

    classes = {"pymemcache": PyMemcacheCacheTests, "shardcache": make_shardcache_class()}
    if args.only:
        classes = {args.only: classes[args.only]}
    loader = unittest.TestLoader()
    runner = DiscoverRunner(verbosity=0, interactive=False)
    runner.setup_test_environment()
    old_config = runner.setup_databases()
    report: dict[str, Any] = {"servers": servers, "classes": {}}
    try:
        for name, cls in classes.items():
            suite = loader.loadTestsFromTestCase(cls)
            print(
                f"== {name}: {cls.__module__}.{cls.__qualname__} ({suite.countTestCases()} tests)",
                file=sys.stderr,
            )
            result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2, resultclass=RecordingResult).run(
                suite
            )
            assert isinstance(result, RecordingResult)
            report["classes"][name] = {
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "tests": result.outcomes,
            }
    finally:
        runner.teardown_databases(old_config)
        runner.teardown_test_environment()
    args.report.write_text(json.dumps(report, indent=2, sort_keys=True))
    bad = [
        test
        for entry in report["classes"].values()
        for test, outcome in entry["tests"].items()
        if outcome["outcome"] in ("failed", "error")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
