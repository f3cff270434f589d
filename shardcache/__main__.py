"""``python -m shardcache``: the same command line as the ``shardcache`` script."""

from shardcache.cli import main

raise SystemExit(main())
