"""Views of the example project.

- ``GET /books/<id>``: the seed's book page, ``@cache_page(60 * 15)``: rendered from SQLite
  (examples/books.py) on a miss, served whole from memcached on a hit.
- ``POST /books/<id>`` with a ``title`` form field: renames the book and deletes the cached page
  (the key ``cache_page`` stored it under, found with ``django.utils.cache.get_cache_key``).
- ``GET /shelf/``: a page built from 20 cached book fragments, ``fragment/<id>``, fetched with one
  ``get_many`` (``?mode=each``: 20 ``get`` calls); misses are rendered and stored with one
  ``set_many``. ``?cache=<alias>`` picks the cache (``pymemcache`` for Django's own backend),
  ``?start=<id>`` the first book. The ``X-Cache-Misses`` header counts the fragments rendered.

``QUERIES.count`` counts the SQL statements run, so tests can tell a hit from a miss.
"""

from __future__ import annotations

import threading

from django.conf import settings
from django.core.cache import caches
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseNotAllowed,
    HttpResponseNotFound,
    JsonResponse,
)
from django.urls import reverse
from django.utils.cache import get_cache_key
from django.views.decorators.cache import cache_page

from examples.books import make_database, render_book_page

SHELF_SIZE = 20
FRAGMENT_TIMEOUT_S = 60 * 15


class QueryCounter:
    """Counts the SQL statements run on a sqlite3 connection (its trace callback)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, statement: str) -> None:
        with self._lock:
            self.count += 1


QUERIES = QueryCounter()
_db = make_database()
_db.set_trace_callback(QUERIES)
_db_lock = threading.Lock()  # one sqlite3 connection, shared by the server's threads


def book(request: HttpRequest, book_id: int) -> HttpResponse:
    if request.method in ("GET", "HEAD"):
        return book_page(request, book_id)
    if request.method == "POST":
        return update_book(request, book_id)
    return HttpResponseNotAllowed(["GET", "HEAD", "POST"])


@cache_page(60 * 15)
def book_page(request: HttpRequest, book_id: int) -> HttpResponse:
    with _db_lock:
        exists = _db.execute("SELECT 1 FROM books WHERE id = ?", (book_id,)).fetchone()
        if exists is None:
            return HttpResponseNotFound(f"no book {book_id}")
        return HttpResponse(render_book_page(_db, book_id))


def update_book(request: HttpRequest, book_id: int) -> HttpResponse:
    title = request.POST.get("title", "").strip()
    if not title:
        return HttpResponseBadRequest("a non-empty title form field is required")
    with _db_lock:
        updated = _db.execute("UPDATE books SET title = ? WHERE id = ?", (title, book_id)).rowcount
        _db.commit()
    if not updated:
        return HttpResponseNotFound(f"no book {book_id}")
    forgotten = forget_book_page(request, book_id)
    return JsonResponse({"id": book_id, "title": title, "cached_pages_deleted": forgotten})


def forget_book_page(request: HttpRequest, book_id: int) -> int:
    """Delete the cached GET and HEAD pages of ``/books/<id>``; the number deleted.

    ``cache_page`` keys a page by its absolute URL (host included) and by the request headers
    the response varies on, so the key is computed from a GET request for the page that carries
    this request's host and headers.
    """
    page = HttpRequest()
    page.META = {**request.META, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
    page.method = "GET"
    page.path = page.path_info = reverse("book", args=[book_id])
    cache = caches[settings.CACHE_MIDDLEWARE_ALIAS]
    deleted = 0
    for method in ("GET", "HEAD"):
        key = get_cache_key(page, method=method, cache=cache)
        if key is not None and cache.delete(key):
            deleted += 1
    return deleted


def _fragment(book_id: int) -> str:
    with _db_lock:
        row = _db.execute("SELECT title, author, year FROM books WHERE id = ?", (book_id,)).fetchone()
    if row is None:
        return f'<li class="missing">book {book_id}</li>'
    return f'<li><a href="/books/{book_id}">{row[0]}</a> by {row[1]} ({row[2]})</li>'


def shelf(request: HttpRequest) -> HttpResponse:
    alias = request.GET.get("cache", "default")
    mode = request.GET.get("mode", "many")
    if alias not in settings.CACHES or mode not in ("many", "each"):
        return HttpResponseBadRequest("cache must be a CACHES alias, mode 'many' or 'each'")
    try:
        start = int(request.GET.get("start", "1"))
    except ValueError:
        return HttpResponseBadRequest("start must be a book id")
    cache = caches[alias]
    keys = [f"fragment/{book_id}" for book_id in range(start, start + SHELF_SIZE)]
    if mode == "many":
        found = cache.get_many(keys)
    else:
        found = {key: value for key in keys if (value := cache.get(key)) is not None}
    missing = {key: _fragment(int(key.rsplit("/", 1)[1])) for key in keys if key not in found}
    if missing:
        cache.set_many(missing, FRAGMENT_TIMEOUT_S)
        found.update(missing)
    response = HttpResponse("<ul>" + "".join(found[key] for key in keys) + "</ul>")
    response["X-Cache-Misses"] = str(len(missing))
    return response
