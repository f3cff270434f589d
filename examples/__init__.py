"""Runnable examples from the article shardcache grew from (books pages, nearby stores, hit counter)."""
