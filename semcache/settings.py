"""Server-edge settings for the semantic cache (environment variables `KVFUSE_SEMCACHE_*`)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from semcache.config import AUTO, SemcacheConfig


class SemcacheSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVFUSE_SEMCACHE_")

    redis_url: str | None = None
    redis_prefix: str = "kvfuse:semcache:"
    redis_wake: bool = False  # a PING before each index search (RedisStore.wake)
    folder: str | None = AUTO
    classifier_examples: str | None = AUTO
    verify: bool = True
    verifier_path: str | None = None  # other verifier weights, e.g. the pair model's (semcache/fit_pair.py)
    verifier_cut: float | None = None
    max_body_bytes: int = 512 * 1024  # a request larger than this is refused with 413 before parsing
    max_scopes: int = 10_000  # (tenant, model, category) indexes held at once; past it inserts are refused

    def cache_config(self) -> SemcacheConfig:
        return SemcacheConfig(
            redis_url=self.redis_url or None,
            redis_prefix=self.redis_prefix,
            redis_wake=self.redis_wake,
            folder=self.folder or None,
            classifier_examples=self.classifier_examples or None,
            verify=self.verify,
            verifier_path=self.verifier_path or None,
            verifier_cut=self.verifier_cut,
            max_scopes=self.max_scopes,
        )
