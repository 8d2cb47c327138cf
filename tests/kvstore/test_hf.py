"""Generation with a reused prefix gives exactly the tokens of generation without the cache."""

from __future__ import annotations

import json

import pytest
import torch

from kvstore import KVConnector, StoreConfig, TieredStore
from kvstore.hf import generate_with_cache, namespace_for

NEW = 12


@pytest.fixture(scope="module")
def prompts(loaded, shared_data):
    """Two prompts of ~150 tokens from real passages that share their first ~100 tokens."""
    item = json.loads((shared_data / "rag" / "musique_s.json").read_text())[0]
    text = " ".join(c["text"] for c in item["ctxs"])
    ids = loaded.tokenizer(text)["input_ids"]
    question = loaded.tokenizer(" Question: " + item["question"] + " Answer:")["input_ids"]
    return ids[:140] + question, ids[:100] + ids[200:240] + question


def _reference(loaded, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = loaded.model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False
    )
    return out[0, len(ids) :].tolist()


def test_reused_prefix_gives_the_same_tokens(loaded, prompts, tmp_path):
    first, second = prompts
    config = StoreConfig(host_bytes=64 << 20, disk_path=str(tmp_path))
    with TieredStore(config) as store:
        conn = KVConnector(store, namespace_for(loaded, chunk_tokens=32))
        cold = generate_with_cache(loaded.model, conn, first, max_new_tokens=NEW)
        assert cold.reused_tokens == 0 and cold.stored_chunks == -(-len(first) // 32)
        assert cold.new_tokens == _reference(loaded, first)
        warm = generate_with_cache(loaded.model, conn, first, max_new_tokens=NEW)
        assert warm.reused_tokens == len(first) - 1 and warm.new_tokens == cold.new_tokens
        shared = generate_with_cache(loaded.model, conn, second, max_new_tokens=NEW)
        assert shared.reused_tokens == 96  # three full 32-token chunks of the common 100 tokens
        assert shared.new_tokens == _reference(loaded, second)
    with TieredStore(config) as store:  # after a restart: the prefix comes from the disk tier
        conn = KVConnector(store, namespace_for(loaded, chunk_tokens=32))
        again = generate_with_cache(loaded.model, conn, second, max_new_tokens=NEW)
        assert again.reused_tokens == len(second) - 1 and again.new_tokens == shared.new_tokens
        assert store.stats()["tiers"]["disk"]["hits"] > 0
