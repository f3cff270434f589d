"""The seed's book page: ``/books/<id>`` rendered from a real SQLite database, cached in memcached.

do we have key 'books/321' in our cache?  if so: return it
else: generate the page, store it at 'books/321', return it
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

RENDER_COST_S = 0.03  # stands in for template rendering and the reviews query of a real app


def make_database() -> sqlite3.Connection:
    """An in-memory library: 1,000 books with a few reviews each."""
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.executescript(
        """
        CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT, author TEXT, year INTEGER);
        CREATE TABLE reviews (book_id INTEGER, stars INTEGER, body TEXT);
        """
    )
    db.executemany(
        "INSERT INTO books VALUES (?, ?, ?, ?)",
        [(i, f"Book number {i}", f"Author {i % 97}", 1900 + i % 120) for i in range(1, 1001)],
    )
    db.executemany(
        "INSERT INTO reviews VALUES (?, ?, ?)",
        [(i, 1 + (i * j) % 5, f"review {j} of book {i}") for i in range(1, 1001) for j in range(3)],
    )
    return db


def render_book_page(db: sqlite3.Connection, book_id: int) -> str:
    """Query the book and its reviews and render the HTML page (the slow path)."""
    row = db.execute("SELECT title, author, year FROM books WHERE id = ?", (book_id,)).fetchone()
    if row is None:
        return "<h1>404</h1>"
    reviews = db.execute("SELECT stars, body FROM reviews WHERE book_id = ?", (book_id,)).fetchall()
    time.sleep(RENDER_COST_S)
    items = "".join(f"<li>{'*' * stars} {body}</li>" for stars, body in reviews)
    return f"<h1>{row[0]}</h1><p>by {row[1]}, {row[2]}</p><ul>{items}</ul>"


def book_page(cache: Any, db: sqlite3.Connection, book_id: int, *, expire: int = 300) -> tuple[str, bool]:
    """The page for ``/books/<id>`` and whether it came from the cache."""
    key = f"books/{book_id}"
    page = cache.get(key)
    if page is not None:
        return page, True
    page = render_book_page(db, book_id)
    cache.set(key, page, expire=expire)
    return page, False


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """``(result, milliseconds)``."""
    start = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - start) * 1000
