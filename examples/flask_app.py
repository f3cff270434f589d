"""The seed's Flask app, cached with Flask-Caching on a shardcache fleet.

    from examples.flask_app import create_app
    app = create_app(["10.0.0.1:11211", "10.0.0.2:11211"])
    app.run()

Routes:

- ``GET /nearby/<postcode>/<radius>``: the stores within ``radius`` km of a postcode district
  (``SW1A``, ``M1``, ...), nearest first, computed from a SQLite table of stores with coordinates.
  Cached exactly as in the seed, ``@cache.cached(timeout=120)``: the key is ``request.path``.
- ``GET /books/<id>``: the book page of examples/books.py (SQL queries and rendering), cached 300 s.
- ``POST /books/<id>`` with a ``title`` form field: renames the book and deletes its cached page,
  so the next ``GET`` shows the new title.

Every cached response says ``X-Cache: hit`` or ``miss`` (from Flask-Caching's signals), and
``app.extensions["query_counter"].count`` counts the SQL statements run, so a test can tell a page
served from memcached from one computed again.
"""

from __future__ import annotations

import math
import random
import sqlite3
import sys
import threading
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, abort, g, jsonify, request
from flask_caching import Cache
from flask_caching.signals import cache_view_hit, cache_view_miss

from examples.books import make_database, render_book_page

EARTH_RADIUS_KM = 6371.0

# Postcode districts with the coordinates of their centre (approximate).
POSTCODE_DISTRICTS = {
    "SW1A": (51.5010, -0.1416),
    "EC1A": (51.5203, -0.0979),
    "N1": (51.5390, -0.1030),
    "E14": (51.5050, -0.0235),
    "M1": (53.4794, -2.2353),
    "B1": (52.4800, -1.9080),
    "LS1": (53.7960, -1.5470),
    "G1": (55.8600, -4.2500),
    "EH1": (55.9521, -3.1895),
    "CF10": (51.4800, -3.1800),
}


class QueryCounter:
    """Counts the SQL statements run on the connections it traces (sqlite3 trace callbacks)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def trace(self, db: sqlite3.Connection) -> sqlite3.Connection:
        db.set_trace_callback(self._seen)
        return db

    def _seen(self, statement: str) -> None:
        with self._lock:
            self.count += 1


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))


def make_store_database(stores_per_district: int = 30, seed: int = 7) -> sqlite3.Connection:
    """An in-memory table of postcode districts and of stores scattered up to ~15 km around them."""
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.create_function("distance_km", 4, distance_km, deterministic=True)
    db.executescript(
        """
        CREATE TABLE postcodes (district TEXT PRIMARY KEY, lat REAL, lon REAL);
        CREATE TABLE stores (id INTEGER PRIMARY KEY, name TEXT, district TEXT, lat REAL, lon REAL);
        """
    )
    db.executemany(
        "INSERT INTO postcodes VALUES (?, ?, ?)", [(d, *ll) for d, ll in POSTCODE_DISTRICTS.items()]
    )
    rng = random.Random(seed)
    rows = []
    for district, (lat, lon) in POSTCODE_DISTRICTS.items():
        for i in range(stores_per_district):
            rows.append(
                (
                    f"{district} store {i + 1}",
                    district,
                    lat + rng.uniform(-0.13, 0.13),
                    lon + rng.uniform(-0.2, 0.2),
                )
            )
    db.executemany("INSERT INTO stores (name, district, lat, lon) VALUES (?, ?, ?, ?)", rows)
    db.commit()
    return db


def create_app(servers: Sequence[str] | str, *, key_prefix: str = "flask_app:") -> Flask:
    """The app, caching in the memcached fleet ``servers`` (node specs, or ``"a:11211,b:11211"``)."""
    app = Flask(__name__)
    app.config.update(
        CACHE_TYPE="shardcache.contrib.flask.ShardCache",
        CACHE_MEMCACHED_SERVERS=servers,
        CACHE_KEY_PREFIX=key_prefix,
        CACHE_DEFAULT_TIMEOUT=300,
        CACHE_OPTIONS={"timeout": 1.0, "connect_timeout": 1.0},
        CACHE_ENABLE_SIGNALS=True,
    )
    cache = Cache(app)
    queries = QueryCounter()
    app.extensions["query_counter"] = queries
    stores = queries.trace(make_store_database())
    books = queries.trace(make_database())
    db_lock = threading.Lock()  # one sqlite3 connection each, shared by the server's threads

    def mark(status: str) -> Any:
        def receiver(sender: Any, *, cache: Cache | None = None, **extra: Any) -> None:
            if cache is app_cache:
                g.cache_status = status

        return receiver

    app_cache = cache
    # Weak receivers, kept alive by the app: they go away with it.
    app.extensions["cache_signal_receivers"] = receivers = (mark("hit"), mark("miss"))
    cache_view_hit.connect(receivers[0])
    cache_view_miss.connect(receivers[1])

    @app.after_request
    def cache_status_header(response: Response) -> Response:
        status = g.get("cache_status")
        if status is not None:
            response.headers["X-Cache"] = status
        return response

    @app.route("/nearby/<postcode>/<radius>")
    @cache.cached(timeout=120)
    def nearby_stores(postcode: str, radius: str) -> Response:
        try:
            radius_km = float(radius)
        except ValueError:
            abort(400, description=f"radius {radius!r} is not a number of kilometres")
        if not 0 <= radius_km <= 100:
            abort(400, description="radius must be between 0 and 100 km")
        with db_lock:
            centre = stores.execute(
                "SELECT lat, lon FROM postcodes WHERE district = ?", (postcode.upper(),)
            ).fetchone()
            if centre is None:
                abort(404, description=f"unknown postcode district {postcode!r}")
            found = stores.execute(
                """
                SELECT name, district, round(km, 2) FROM (
                    SELECT name, district, distance_km(?, ?, lat, lon) AS km FROM stores
                ) WHERE km <= ? ORDER BY km, name
                """,
                (centre[0], centre[1], radius_km),
            ).fetchall()
        return jsonify(
            postcode=postcode.upper(),
            radius_km=radius_km,
            stores=[{"name": name, "district": district, "km": km} for name, district, km in found],
        )

    @app.get("/books/<int:book_id>")
    @cache.cached(timeout=300)
    def book_page(book_id: int) -> str:
        with db_lock:
            return render_book_page(books, book_id)

    @app.post("/books/<int:book_id>")
    def update_book(book_id: int) -> Response:
        title = request.form.get("title", "").strip()
        if not title:
            abort(400, description="a non-empty title form field is required")
        with db_lock:
            updated = books.execute("UPDATE books SET title = ? WHERE id = ?", (title, book_id)).rowcount
            books.commit()
        if not updated:
            abort(404)
        # The page was cached under the key @cache.cached built from its path: delete exactly that.
        cache.delete_cached(book_page, path=f"/books/{book_id}")
        return jsonify(id=book_id, title=title)

    return app


if __name__ == "__main__":  # python -m examples.flask_app 127.0.0.1:11211,127.0.0.1:11212
    create_app(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:11211").run()
