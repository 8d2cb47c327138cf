"""ReKV on the real model: exactness with every block, block recall of planted facts, the store."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvstore.config import StoreConfig
from kvstore.store import TieredStore
from retrieval.rekv import ReKV, ReKVConfig
from retrieval.tasks import NAMES, fact_stream

SMALL = dict(block_tokens=32, n_init=32, n_local=128)
FACT_BLOCKS = [8]


@pytest.fixture(scope="module")
def stream(engine, texts):
    return fact_stream(engine.tokenizer, texts, 640, FACT_BLOCKS, block_tokens=32, n_init=32, seed=1)


@pytest.fixture(scope="module")
def encoded(engine, stream):
    store = TieredStore(StoreConfig(host_bytes=1 << 30, write_behind=False))
    # The paper's setting (mean keys, top-k per layer); the shared selection has its own test below.
    config = ReKVConfig(top_k=4, scoring="query", representative="mean", selection="layer", **SMALL)
    r = ReKV(engine, config, store)
    r.encode(stream.ids[:250])  # streamed in two arrivals, the second starting mid-block
    r.encode(stream.ids[250:])
    return r


def test_every_block_gives_the_full_cache_tokens(engine, stream):
    question = stream.facts[0].question
    full, _ = engine.generate(stream.ids + question, 10, stop=set())
    r = ReKV(engine, ReKVConfig(block_tokens=32, n_init=32, n_local=1024, top_k=64))
    r.encode(stream.ids)
    assert r.answer(question, 10, stop=set()) == full


def test_planted_facts_blocks_are_retrieved(engine, stream, encoded):
    r = encoded
    assert r.num_blocks == (640 - 32) // 32
    for fact in stream.facts:
        block = r.block_of(fact.position)
        assert block in FACT_BLOCKS
        r.answer(fact.question, 1, stop=set())
        hits = [block in sel for sel in r.last_selection.values()]
        assert len(hits) == engine.spec.num_layers
        # Measured 22 of 30 layers here; a random pick of 4 of 19 blocks would hit about 6.
        assert sum(hits) / len(hits) >= 0.5, f"block {block} recalled at {sum(hits)} of {len(hits)} layers"


def test_shared_selection_gives_every_layer_the_facts_block(engine, stream, encoded):
    r = encoded
    fact = stream.facts[0]
    window_rows, window_positions = len(r.window), r.window.positions.clone()
    blocks = r.shared_selection(torch.as_tensor(fact.question))
    # The question's pass over the sliding window leaves the stream's window as it was.
    assert len(r.window) == window_rows and torch.equal(r.window.positions, window_positions)
    assert all(layer.k.shape[2] == window_rows for layer in r.window.layers)
    assert len(blocks) == 4 and blocks == sorted(blocks)
    r.config = dataclasses.replace(r.config, selection="shared")
    try:
        r.answer(fact.question, 1, stop=set(), focus=fact.focus)
    finally:
        r.config = dataclasses.replace(r.config, selection="layer")
    assert len(r.last_selection) == engine.spec.num_layers
    chosen = r.last_selection[0]
    assert all(sel == chosen for sel in r.last_selection.values())
    # Measured: found here with mean keys (the per-layer pick finds it at 22 of 30 layers).
    assert r.block_of(fact.position) in chosen


def test_key_scoring_ranks_the_facts_block_first(engine, stream):
    """The default scoring: the question's keys at the index layer against every stored token key."""
    r = ReKV(engine, ReKVConfig(top_k=4, **SMALL))
    r.encode(stream.ids)
    fact = stream.facts[0]
    scores = r.key_scores(fact.question, fact.focus)
    want = r.block_of(fact.position)
    assert int(scores.argmax()) == want, f"block {want} ranked {int((scores > scores[want]).sum())}"
    r.answer(fact.question, 1, stop=set(), focus=fact.focus)
    assert all(want in sel for sel in r.last_selection.values())
    # the index is resident: keys (no values) of one layer for every stored token, within the budget
    per_layer_token = engine.spec.kv_bytes_per_token // engine.spec.num_layers
    assert r.index_bytes() == r.num_blocks * 32 * per_layer_token // 2
    assert r.stats.peak_resident_bytes <= r.budget_bytes


def test_stream_kv_lives_in_the_store_within_the_budget(engine, encoded):
    r = encoded
    host = r.store.stats()["tiers"]["host"]
    assert host["entries"] == r.num_blocks * engine.spec.num_layers == len(r.units)
    assert host["bytes"] >= r.num_blocks * 32 * engine.spec.kv_bytes_per_token
    assert r.stats.peak_resident_bytes <= r.budget_bytes
    assert len(r.window) == 32 + 128  # only the initial tokens and the local window stay resident
    assert r.window.nbytes() < 640 * engine.spec.kv_bytes_per_token / 3


def test_stream_survives_a_reopened_disk_store(engine, stream, tmp_path):
    config = ReKVConfig(top_k=4, lru_blocks=0, **SMALL)
    store = TieredStore(StoreConfig(host_bytes=0, disk_path=str(tmp_path), write_behind=True))
    r = ReKV(engine, config, store)
    r.encode(stream.ids)
    question = stream.facts[0].question
    before = r.answer(question, 6, stop=set())
    store.close()
    reopened = TieredStore(StoreConfig(host_bytes=0, disk_path=str(tmp_path)))
    with pytest.raises(ValueError, match="lacks"):
        r.use_store(TieredStore(StoreConfig(host_bytes=1 << 20, write_behind=False)))
    r.use_store(reopened)
    assert r.answer(question, 6, stop=set()) == before
    disk = reopened.stats()["tiers"]["disk"]
    assert disk["hits"] == 4 * engine.spec.num_layers and disk["corrupt"] == 0
    reopened.close()


def test_bad_configs_and_calls(engine):
    with pytest.raises(ValueError, match="n_local"):
        ReKVConfig(block_tokens=64, n_local=32)
    with pytest.raises(ValueError, match="top_k"):
        ReKVConfig(top_k=0)
    with pytest.raises(ValueError, match="representative"):
        ReKVConfig(representative="max")
    with pytest.raises(ValueError, match="selection"):
        ReKVConfig(selection="global")
    with pytest.raises(ValueError, match="scoring"):
        ReKVConfig(scoring="attention")
    with pytest.raises(ValueError, match="needs scoring"):
        ReKVConfig(selection="layer")
    with pytest.raises(ValueError, match="index_layers"):
        ReKV(engine, ReKVConfig(index_layers=(30,), **SMALL))
    r = ReKV(engine, ReKVConfig(**SMALL))
    with pytest.raises(ValueError, match="empty"):
        r.answer([1, 2, 3], 4)
    r.encode(list(range(100, 200)))
    with pytest.raises(ValueError, match="no row"):
        r.answer([1, 2, 3], 4, focus=slice(3, None))
    with pytest.raises(TypeError, match="focus"):
        r.answer([1, 2, 3], 4, focus=[0, 1])
    with pytest.raises(TypeError, match="answer_cache"):
        engine.forward([1, 2, 3], attention=r.attention)


def test_fact_stream_states_facts_in_the_questions_words(engine, texts, stream):
    """The planted sentence shares the question's tokens (it was once lower-cased, so "Captain Mora"
    became other tokens), its focus rows are the question's words, and no passage repeats."""
    assert len(texts) == len(set(texts))
    tok = engine.tokenizer
    for fact in stream.facts:
        words = tok.decode(fact.question[fact.focus])
        assert words.startswith("\nQuestion:") and words.endswith("?")
        assert "<|im_end|>" in tok.decode(fact.question[fact.focus.stop :])
        planted = tok.decode(stream.ids[fact.position : fact.position + 24])
        assert fact.answer in planted
        name = next(n for n in NAMES if n in words)
        assert name in planted
    every = fact_stream(tok, texts, 640, list(range(1, 17, 2)), block_tokens=32, n_init=32, seed=0)
    captain = [f for f in every.facts if "Captain Mora" in tok.decode(f.question)]
    assert len(captain) == 1
    assert "Captain Mora" in tok.decode(every.ids[captain[0].position : captain[0].position + 24])
