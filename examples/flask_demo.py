"""``make demo``'s web section: the seed's Flask app (examples/flask_app.py) on the local cluster.

Requests go through Flask's test client (no port is opened): misses then hits on the seed's two
routes, and an update that invalidates the cached book page.
"""

from __future__ import annotations

import time

from examples.flask_app import create_app
from shardcache.testing import LocalCluster


def demo(cluster: LocalCluster) -> None:
    app = create_app(cluster.specs, key_prefix="flask_demo:")
    web = app.test_client()

    def get(path: str) -> str:
        started = time.perf_counter()
        response = web.get(path)
        took = (time.perf_counter() - started) * 1000
        status = response.headers.get("X-Cache", "-")
        return f"GET {path:<22} {response.status_code} X-Cache: {status:<4} {took:6.2f} ms"

    for path in ("/nearby/SW1A/5", "/nearby/SW1A/5", "/books/321", "/books/321"):
        print(f"  {get(path)}")
    response = web.post("/books/321", data={"title": "A new title"})
    print(f"  POST /books/321 (title changed in SQLite; the cached page is deleted): {response.status_code}")
    print(f"  {get('/books/321')}")
    page = web.get("/books/321").get_data(as_text=True)
    print(f"  {get('/books/321')}   page shows the new title: {'A new title' in page}")


if __name__ == "__main__":
    with LocalCluster(3, backend="auto") as local:
        demo(local)
