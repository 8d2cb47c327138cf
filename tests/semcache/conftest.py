"""Fixtures for the semantic cache: one real embedder per session, caches on real Redis."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedder():
    from semcache.embed import Embedder

    return Embedder()


@pytest.fixture
def make_cache(embedder, redis_url, redis_prefix, tmp_path, shared_data):
    """Build caches on this test's Redis prefix and folder; every one is closed afterwards."""
    from semcache.cache import SemanticCache
    from semcache.config import SemcacheConfig

    made = []

    def make(**overrides):
        fields = {
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "folder": str(tmp_path / "semcache"),
            "classifier_examples": str(shared_data / "semcache" / "domain_questions_dev.json"),
        }
        fields.update(overrides)
        cache = SemanticCache(SemcacheConfig(**fields), embedder=embedder)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()
