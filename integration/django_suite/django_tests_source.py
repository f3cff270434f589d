"""Django's own cache tests (``tests/cache/`` of Django's source distribution), fetched on demand.

The memcached test cases (``BaseMemcachedTests``, ``PyMemcacheCacheTests``) live in the sdist, not
in the wheel. :func:`ensure_django_tests` downloads the sdist of the *installed* Django version
from PyPI with pip, extracts only ``tests/cache/`` into a cache directory outside the repository
(``<venv>/shardcache-cache/django-<version>-tests/``, or ``$SHARDCACHE_DJANGO_TESTS_DIR``), and
returns the ``tests`` directory to put on ``sys.path``. Nothing of Django's is ever written into the
repository. Run as a script, it prints that directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

__all__ = ["DjangoTestsUnavailableError", "django_version", "ensure_django_tests"]

_PIP_TIMEOUT_S = 300


class DjangoTestsUnavailableError(RuntimeError):
    """The sdist could not be downloaded or did not contain tests/cache/."""


def django_version() -> str:
    return metadata.version("django")


def _cache_root() -> Path:
    configured = os.environ.get("SHARDCACHE_DJANGO_TESTS_DIR")
    return Path(configured) if configured else Path(sys.prefix) / "shardcache-cache"


def ensure_django_tests() -> Path:
    """The ``tests`` directory holding Django's ``cache`` test app, downloading it if needed."""
    version = django_version()
    target = _cache_root() / f"django-{version}-tests"
    if (target / ".complete").is_file():
        return target / "tests"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", f"django=={version}",
            "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp,
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise DjangoTestsUnavailableError(f"pip download of django=={version} timed out") from exc
        archives = sorted(Path(tmp).glob("[Dd]jango-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise DjangoTestsUnavailableError(
                f"could not download the sdist of django=={version} from PyPI "
                f"(`{' '.join(command)}` exited {done.returncode}):\n{done.stderr[-2000:]}"
            )
        staging = Path(tmp) / "staging"
        prefix = f"{archives[0].name.removesuffix('.tar.gz')}/tests/cache/"
        with tarfile.open(archives[0]) as archive:
            members = [
                m for m in archive.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())
            ]
            if not any(m.name == prefix + "tests.py" for m in members):
                raise DjangoTestsUnavailableError(f"{archives[0].name} has no {prefix}tests.py")
            for member in members:
                member.name = "tests/cache/" + member.name[len(prefix) :]
            if hasattr(tarfile, "data_filter"):
                archive.extractall(staging, members=members, filter="data")
            else:  # Python < 3.11.4; members are plain files and directories under tests/cache/
                archive.extractall(staging, members=members)
        (staging / ".complete").write_text(f"django {version} sdist: {archives[0].name}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target / "tests"


if __name__ == "__main__":
    print(ensure_django_tests())
