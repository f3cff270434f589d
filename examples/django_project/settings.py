"""Settings of the example project. The memcached fleet comes from ``SHARDCACHE_SERVERS``
(``"host:port,host:port"``; default ``127.0.0.1:11211``)."""

from __future__ import annotations

import os

SHARDCACHE_SERVERS = os.environ.get("SHARDCACHE_SERVERS", "127.0.0.1:11211")

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-key-not-for-production")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "examples.django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}  # the books live in examples/books.py's SQLite database
USE_TZ = True

CACHES = {
    # What the pages use: ShardCache over the whole fleet. Values are pickled (Django caches whole
    # responses); OPTIONS are shardcache.Client options.
    "default": {
        "BACKEND": "shardcache.contrib.django.ShardCache",
        "LOCATION": SHARDCACHE_SERVERS,
        "KEY_PREFIX": "django_project",
        "TIMEOUT": 300,
        "OPTIONS": {"timeout": 1.0, "connect_timeout": 1.0},
    },
    # Django's own pymemcache backend over the same fleet, for comparison (/shelf/?cache=pymemcache,
    # benchmarks/django_bench.py).
    "pymemcache": {
        "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
        "LOCATION": SHARDCACHE_SERVERS,
        "KEY_PREFIX": "django_project_pymemcache",
        "TIMEOUT": 300,
        "OPTIONS": {"timeout": 1.0, "connect_timeout": 1.0},
    },
}
