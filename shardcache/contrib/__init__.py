"""Web framework integrations, built on the public ``shardcache`` API only.

- :mod:`shardcache.contrib.django`: ``ShardCache``, a Django cache backend
  (``"BACKEND": "shardcache.contrib.django.ShardCache"``); needs Django.
- :mod:`shardcache.contrib.flask`: ``ShardCache``, a Flask-Caching backend
  (``CACHE_TYPE = "shardcache.contrib.flask.ShardCache"``); needs Flask-Caching.

Both cache arbitrary picklable objects, as the frameworks expect, so both default to pickling
(:class:`shardcache.PickleSerde`); both take ``serde`` in their options to use
:class:`shardcache.SignedPickleSerde` instead. Importing this package imports neither framework.
"""

from __future__ import annotations

import shardcache

__all__: list[str] = []


def _original_pickling_error(exc: shardcache.SerializationError) -> BaseException:
    """The exception to raise to a framework caller for a value that could not be serialized.

    Django's and cachelib's backends pickle with :func:`pickle.dumps` and let its exception
    through (``pickle.PickleError``, ``TypeError: cannot pickle ...``); code written for them
    catches those. ``SerializationError`` chains that original exception: hand it back, with
    shardcache's message (which names the key) attached as a note. Anything else is returned as is.
    """
    cause: BaseException | None = exc.__cause__
    if cause is None or isinstance(cause, shardcache.ShardcacheError):
        return exc
    if hasattr(cause, "add_note"):  # Python >= 3.11
        cause.add_note(str(exc))
    return cause
