"""A minimal Django project: the seed's ``/books/<id>`` page with ``@cache_page(60 * 15)``,
cached in a memcached fleet through ``shardcache.contrib.django.ShardCache``.

    SHARDCACHE_SERVERS=127.0.0.1:11211,127.0.0.1:11212 python examples/django_project/manage.py runserver

See settings.py for the cache configuration and views.py for the pages.
"""
