"""The HF engine adapter over RemoteConnector: prefix reuse through a real server gives the same tokens."""

from __future__ import annotations

import json

import torch

from kvstore.hf import generate_with_cache, namespace_for
from kvstore.remote import RemoteConnector

NEW = 8


def _reference(loaded, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = loaded.model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False
    )
    return out[0, len(ids) :].tolist()


def test_generate_with_a_remote_prefix(loaded, shared_data, server):
    item = json.loads((shared_data / "rag" / "musique_s.json").read_text())[1]
    ids = loaded.tokenizer(" ".join(c["text"] for c in item["ctxs"]))["input_ids"]
    question = loaded.tokenizer(" Question: " + item["question"] + " Answer:")["input_ids"]
    first, second = ids[:110] + question, ids[:70] + ids[150:180] + question
    conn = RemoteConnector(server.url, namespace_for(loaded, chunk_tokens=32, salt="remote-engine"))
    cold = generate_with_cache(loaded.model, conn, first, max_new_tokens=NEW)
    assert cold.reused_tokens == 0 and cold.new_tokens == _reference(loaded, first)
    warm = generate_with_cache(loaded.model, conn, first, max_new_tokens=NEW)
    assert warm.reused_tokens == len(first) - 1 and warm.new_tokens == cold.new_tokens
    shared = generate_with_cache(loaded.model, conn, second, max_new_tokens=NEW)
    assert shared.reused_tokens == 64  # two full 32-token chunks of the common 70 tokens
    assert shared.new_tokens == _reference(loaded, second)
    assert server.client().stats()["tiers"]["host"]["hits"] > 0
