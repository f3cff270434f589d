"""URLs of the example project."""

from __future__ import annotations

from django.urls import path

from examples.django_project import views

urlpatterns = [
    path("books/<int:book_id>", views.book, name="book"),
    path("shelf/", views.shelf, name="shelf"),
]
