"""LangChain cache adapter (optional extra `kvfuse[langchain]`): `set_llm_cache(KvfuseSemanticCache(...))`.

The LLM configuration string (model name, temperature, stop words...) becomes the cache's *model*
scope through a hash, so two LLM configurations never share answers (a hard filter, like tenants).
Generations are stored as LangChain's JSON serialization and read back allowing only core classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from typing import Any

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.load import dumps, loads

from semcache.cache import SemanticCache

log = logging.getLogger(__name__)
FORMAT = "langchain-generations/1"


def llm_scope(llm_string: str) -> str:
    return "lc-" + hashlib.blake2b(llm_string.encode(), digest_size=12).hexdigest()


class KvfuseSemanticCache(BaseCache):
    def __init__(self, cache: SemanticCache, tenant: str, category: str | None = None) -> None:
        self.cache, self.tenant, self.category = cache, tenant, category

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        try:
            res = self.cache.lookup(prompt, self.tenant, category=self.category, model=llm_scope(llm_string))
        except ValueError as exc:  # e.g. a prompt over the length limit: not cacheable, not an error
            log.debug("semcache: lookup skipped: %s", exc)
            return None
        if not res.hit or res.metadata.get("format") != FORMAT:
            return None
        return self._decode(res.answer or "[]")

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        answer = json.dumps([dumps(g) for g in return_val])
        try:
            self.cache.insert(
                prompt,
                answer,
                self.tenant,
                category=self.category,
                model=llm_scope(llm_string),
                metadata={"format": FORMAT},
            )
        except ValueError as exc:
            log.debug("semcache: update skipped: %s", exc)

    def clear(self, **kwargs: Any) -> None:
        """Drop this tenant's entries (all LLM configurations, or `llm_string=` for one)."""
        llm_string = kwargs.get("llm_string")
        self.cache.invalidate(self.tenant, model=llm_scope(llm_string) if llm_string else None)

    @staticmethod
    def _decode(answer: str) -> Sequence[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loads() is marked beta; the format is stable for core classes
            return [loads(g, allowed_objects="core") for g in json.loads(answer)]
