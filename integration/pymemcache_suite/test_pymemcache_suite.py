"""pymemcache's own integration suite, run against ``shardcache.Client`` over 3 real memcached nodes.

The test functions below are pymemcache's (``pymemcache.test.test_integration``), imported by name so
that pytest collects them here with their own marks and parametrization. The fixtures they take come
from ``conftest.py`` beside this file: ``client_class(server, **kwargs)`` builds a real
``shardcache.Client`` over all 3 nodes of the session cluster, so every key a test touches is routed
by our ring, and multi-key calls (``get_many``) fan out over the nodes.

What is not run as-is, and why:

- ``test_tls`` is left out: pymemcache marks it skipped itself (pinterest/pymemcache#39) and it needs
  certificate files the package does not ship. TLS is covered by ``integration/test_tls.py``.
- ``test_errors`` is not collected directly. Its last check, ``client.set(b"key", "\\u0FFF")`` must
  raise, contradicts shardcache on purpose: our default serde stores ``str`` values as UTF-8, where
  pymemcache's default (no serde) only takes ASCII text. Rather than copy the test minus that line,
  :func:`test_pymemcache_test_errors_fails_only_at_its_unicode_value_check` runs pymemcache's
  ``test_errors`` itself and asserts that it fails at exactly that check and nowhere else: since that
  check is the test's last statement, every other assertion in it (keys with spaces or CR/LF, too
  long, non-ASCII keys in set and get) is proven to pass against shardcache.

Three of pymemcache's tests build ``pymemcache.client.base.Client`` themselves instead of using
``client_class``: ``test_incr_decr``, ``test_misc`` and ``test_serialization_deserialization``. They
run against node 0 only and exercise pymemcache, not shardcache; they are kept because they pass and
show that the cluster's nodes behave as the memcached pymemcache is tested against.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterator
from types import ModuleType, TracebackType

import pytest
from pymemcache.test import test_integration as upstream
from pymemcache.test.test_integration import (
    test_add_replace,
    test_append_prepend,
    test_cas,
    test_delete,
    test_get_set,
    test_get_set_large,
    test_get_set_unicode_key,
    test_gets,
    test_incr_decr,
    test_misc,
    test_serde_serialization,
    test_serde_serialization0,
    test_serde_serialization2,
    test_serialization_deserialization,
    test_touch,
)

import shardcache

# pymemcache's tests collected here, unchanged.
COLLECTED = (
    test_add_replace,
    test_append_prepend,
    test_cas,
    test_delete,
    test_get_set,
    test_get_set_large,
    test_get_set_unicode_key,
    test_gets,
    test_incr_decr,
    test_misc,
    test_serde_serialization,
    test_serde_serialization0,
    test_serde_serialization2,
    test_serialization_deserialization,
    test_touch,
)
# pymemcache's tests not collected directly, with the reason (see the module docstring).
NOT_COLLECTED = {
    "test_errors": "run by test_pymemcache_test_errors_fails_only_at_its_unicode_value_check",
    "test_tls": "skipped by pymemcache itself; TLS is covered by integration/test_tls.py",
}


def _upstream_tests(module: ModuleType) -> set[str]:
    return {
        name for name, value in vars(module).items() if name.startswith("test_") and inspect.isfunction(value)
    }


def test_every_pymemcache_integration_test_is_collected_or_accounted_for() -> None:
    """A pymemcache upgrade that adds or renames a test must show up here, not be silently skipped."""
    collected = {func.__name__ for func in COLLECTED}
    assert all(getattr(upstream, func.__name__) is func for func in COLLECTED)
    assert collected.isdisjoint(NOT_COLLECTED)
    assert _upstream_tests(upstream) == collected | set(NOT_COLLECTED)


def _walk(tb: TracebackType | None) -> Iterator[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _unicode_value_check_lines() -> range:
    """The source lines of ``test_errors``'s ``with pytest.raises(...): _unicode_value_in_set()``.

    Also checks that this block is the last statement of ``test_errors``, so a failure there means
    every statement before it ran and passed.
    """
    lines, first_line = inspect.getsourcelines(upstream.test_errors)
    function = ast.parse(textwrap.dedent("".join(lines))).body[0]
    assert isinstance(function, ast.FunctionDef)
    assert function.name == "test_errors"
    last = function.body[-1]
    assert isinstance(last, ast.With), "pymemcache's test_errors changed: revisit this test"
    (call,) = last.body
    assert isinstance(call, ast.Expr)
    assert isinstance(call.value, ast.Call)
    assert isinstance(call.value.func, ast.Name)
    assert call.value.func.id == "_unicode_value_in_set"
    assert last.end_lineno is not None
    return range(first_line + last.lineno - 1, first_line + last.end_lineno)


def test_pymemcache_test_errors_fails_only_at_its_unicode_value_check(
    client_class: Callable[..., shardcache.Client], host: str, port: int, socket_module: ModuleType
) -> None:
    """pymemcache's ``test_errors`` passes against shardcache up to its last check, which fails by design.

    That check expects ``client.set(b"key", "\\u0FFF")`` to raise ``MemcacheClientError`` because
    pymemcache without a serde only stores ASCII text. shardcache's default serde stores any ``str``
    as UTF-8 (and reads it back as ``str``), so the set succeeds and ``pytest.raises`` reports
    ``DID NOT RAISE``. We assert that this is the only failure: it is raised from the ``with`` block
    of that check, the last statement of the test.
    """
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE") as failure:
        upstream.test_errors(client_class, host, port, socket_module)

    assert "MemcacheClientError" in str(failure.value)
    lines_in_test_errors = [
        tb.tb_lineno for tb in _walk(failure.tb) if tb.tb_frame.f_code is upstream.test_errors.__code__
    ]
    assert len(lines_in_test_errors) == 1
    assert lines_in_test_errors[0] in _unicode_value_check_lines(), lines_in_test_errors
    # and the value was stored, as UTF-8, and reads back as the same str
    client = client_class((host, port), socket_module=socket_module)
    assert client.get(b"key") == "\u0fff"
