"""The example apps against the real session cluster, through their frameworks' test clients.

A hit or a miss is told by what the app did, never by timing: the ``X-Cache`` header (Flask, from
Flask-Caching's signals), the count of SQL statements run, and the ``X-Cache-Misses`` header of
the Django shelf page.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from examples.flask_app import POSTCODE_DISTRICTS, create_app, distance_km, make_store_database
from shardcache.testing import LocalCluster

# -- Flask: examples/flask_app.py ------------------------------------------------------------------


@pytest.fixture
def flask_app(cluster: LocalCluster) -> Iterator[Flask]:
    app = create_app(cluster.specs)
    yield app
    app.extensions["cache"][next(iter(app.extensions["cache"]))].client.close()


@pytest.fixture
def browser(flask_app: Flask) -> FlaskClient:
    return flask_app.test_client()


def queries(app: Flask) -> int:
    count: int = app.extensions["query_counter"].count
    return count


def test_nearby_is_computed_once_then_served_from_the_cache(flask_app: Flask, browser: FlaskClient) -> None:
    before = queries(flask_app)
    first = browser.get("/nearby/SW1A/5")
    assert first.status_code == 200
    assert first.headers["X-Cache"] == "miss"
    assert queries(flask_app) > before
    body = first.get_json()
    assert body["postcode"] == "SW1A"
    assert body["stores"], "no store within 5 km of SW1A"
    kms = [store["km"] for store in body["stores"]]
    assert kms == sorted(kms)
    assert all(km <= 5 for km in kms)

    before = queries(flask_app)
    second = browser.get("/nearby/SW1A/5")
    assert second.headers["X-Cache"] == "hit"
    assert queries(flask_app) == before  # no SQL at all
    assert second.get_json() == body


def test_nearby_results_are_the_stores_within_the_radius(browser: FlaskClient) -> None:
    lat, lon = POSTCODE_DISTRICTS["M1"]
    everything = make_store_database().execute("SELECT name, lat, lon FROM stores").fetchall()
    expected = sorted((distance_km(lat, lon, s_lat, s_lon), name) for name, s_lat, s_lon in everything)
    for radius in (3, 12, 30):
        body = browser.get(f"/nearby/M1/{radius}").get_json()
        found = [(store["km"], store["name"]) for store in body["stores"]]
        assert found == [(round(km, 2), name) for km, name in expected if km <= radius]
        assert found


def test_nearby_cache_is_keyed_by_path(browser: FlaskClient) -> None:
    assert browser.get("/nearby/EC1A/3").headers["X-Cache"] == "miss"
    assert browser.get("/nearby/EC1A/4").headers["X-Cache"] == "miss"
    assert browser.get("/nearby/N1/3").headers["X-Cache"] == "miss"
    assert browser.get("/nearby/EC1A/3").headers["X-Cache"] == "hit"
    # a path memcached could not take as a key (a space) is cached too
    assert browser.get("/nearby/SW1A%201AA/3").status_code == 404
    assert browser.get("/nearby/SW1A%201AA/3").headers["X-Cache"] == "hit"
    assert browser.get("/nearby/SW1A/not-a-number").status_code == 400


def test_book_page_update_invalidates_the_cached_page(flask_app: Flask, browser: FlaskClient) -> None:
    first = browser.get("/books/42")
    assert first.headers["X-Cache"] == "miss"
    assert "<h1>Book number 42</h1>" in first.get_data(as_text=True)
    assert browser.get("/books/42").headers["X-Cache"] == "hit"

    updated = browser.post("/books/42", data={"title": "The Hitchhiker's Guide"})
    assert updated.status_code == 200
    assert updated.get_json() == {"id": 42, "title": "The Hitchhiker's Guide"}

    before = queries(flask_app)
    fresh = browser.get("/books/42")
    assert fresh.headers["X-Cache"] == "miss"
    assert queries(flask_app) > before
    assert "<h1>The Hitchhiker&#39;s Guide</h1>" in fresh.get_data(as_text=True) or (
        "<h1>The Hitchhiker's Guide</h1>" in fresh.get_data(as_text=True)
    )
    again = browser.get("/books/42")
    assert again.headers["X-Cache"] == "hit"
    assert again.get_data() == fresh.get_data()
    assert browser.get("/books/43").headers["X-Cache"] == "miss"  # other pages untouched by the update


def test_book_pages_are_spread_over_every_node(
    flask_app: Flask, browser: FlaskClient, cluster: LocalCluster
) -> None:
    for book_id in range(1, 31):
        assert browser.get(f"/books/{book_id}").status_code == 200
    per_node = {node: int(stats[b"curr_items"]) for node, stats in _backend(flask_app).client.stats().items()}
    assert set(per_node) == set(cluster.specs)
    assert all(count > 0 for count in per_node.values()), per_node
    assert sum(per_node.values()) == 30


def _backend(app: Flask) -> Any:
    return next(iter(app.extensions["cache"].values()))


# -- Django: examples/django_project/ --------------------------------------------------------------


@pytest.fixture
def django_client(django_settings: Any) -> Any:
    from django.test import Client

    return Client()


def sql_count() -> int:
    from examples.django_project.views import QUERIES

    return QUERIES.count


def test_django_book_page_miss_then_hit(django_client: Any) -> None:
    before = sql_count()
    first = django_client.get("/books/7")
    assert first.status_code == 200
    assert b"<h1>Book number 7</h1>" in first.content
    assert sql_count() > before
    assert "max-age=900" in first["Cache-Control"]  # cache_page(60 * 15)

    before = sql_count()
    second = django_client.get("/books/7")
    assert second.status_code == 200
    assert second.content == first.content
    assert sql_count() == before  # served whole from memcached


def test_django_update_invalidates_the_cached_page(django_client: Any) -> None:
    django_client.get("/books/8")
    before = sql_count()
    django_client.get("/books/8")
    assert sql_count() == before

    updated = django_client.post("/books/8", {"title": "Renamed"})
    assert updated.status_code == 200
    assert updated.json() == {"id": 8, "title": "Renamed", "cached_pages_deleted": 1}

    before = sql_count()
    fresh = django_client.get("/books/8")
    assert b"<h1>Renamed</h1>" in fresh.content
    assert sql_count() > before
    before = sql_count()
    assert django_client.get("/books/8").content == fresh.content
    assert sql_count() == before


@pytest.mark.parametrize("alias", ["default", "pymemcache"])
@pytest.mark.parametrize("mode", ["many", "each"])
def test_django_shelf_caches_its_twenty_fragments(django_client: Any, alias: str, mode: str) -> None:
    url = f"/shelf/?cache={alias}&mode={mode}&start=100"
    first = django_client.get(url)
    assert first.status_code == 200
    assert first["X-Cache-Misses"] == "20"
    assert first.content.count(b"<li>") == 20
    before = sql_count()
    second = django_client.get(url)
    assert second["X-Cache-Misses"] == "0"
    assert second.content == first.content
    assert sql_count() == before
