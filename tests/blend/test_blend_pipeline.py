"""The RAG pipeline end to end on the real model: ingest, retrieve, fuse, decode; disk-tier restart."""

from __future__ import annotations

import pytest
import torch
from blend_cases import PASSAGES

from blend.passages import SplitConfig, split_document
from blend.pipeline import RagConfig, RagPipeline
from engine.chat import encode, passage_text
from kvstore import StoreConfig, TieredStore
from kvstore.format import Entry

DOCS = [
    {"id": "paris", "title": "Eiffel Tower", "text": PASSAGES[0]},
    {"id": "japan", "title": "Mount Fuji", "text": PASSAGES[1]},
    PASSAGES[2],
]


@pytest.fixture
def pipeline(engine, store):
    return RagPipeline(engine, store, config=RagConfig(max_new_tokens=12, progress=False))


def test_ingest_then_answer_from_retrieved_passages(engine, pipeline):
    first = pipeline.ingest(DOCS)
    assert [p.doc_id for p in first.passages] == ["paris", "japan", "doc-2"]
    assert first.computed == 3 and first.reused == 0
    again = pipeline.ingest(DOCS)
    assert again.computed == 0 and again.reused == 3
    assert pipeline.select("How tall is Mount Fuji?", 1)[0].doc_id == "japan"
    answer = pipeline.answer("Is Mount Fuji taller than the Eiffel Tower?", top_k=2)
    assert answer.method == "cacheblend"
    assert answer.reused_passages == 2 and answer.computed_passages == 0
    assert set(answer.passages) == {first.passages[0].id, first.passages[1].id}
    assert answer.text and 0 < answer.new_tokens <= 12
    assert 0 < answer.recompute_fraction < 0.5


def test_cacheblend_at_ratio_one_answers_like_full_prefill(engine, store):
    exact = RagPipeline(engine, store, config=RagConfig(max_new_tokens=12, progress=False))
    exact.config.blend.ratio = 1.0
    question = "When was the Eiffel Tower completed?"
    fused = exact.answer(question, passages=PASSAGES)
    full = exact.answer(question, passages=PASSAGES, method="full_prefill")
    assert fused.text == full.text and fused.text
    assert full.method == "full_prefill" and full.recompute_fraction is None


def test_a_passage_missing_from_the_store_is_computed_and_stored(pipeline):
    new = "The Colosseum in Rome is an oval amphitheatre built of travertine, tuff and brick-faced concrete."
    ids = encode(pipeline.tokenizer, passage_text(new))
    assert not pipeline.connector.has_segment(ids)
    answer = pipeline.answer("What is the Colosseum built of?", passages=[new, PASSAGES[0]])
    assert answer.computed_passages == 2 and answer.reused_passages == 0
    assert pipeline.connector.has_segment(ids)
    assert pipeline.answer("What is the Colosseum built of?", passages=[new]).reused_passages == 1


def test_a_segment_stored_without_positions_is_recomputed_not_misplaced(engine, pipeline):
    """An entry under a segment key without positions (put straight into the store, not through the
    connector, which records them) cannot be re-rotated: its rows are recomputed."""
    ids = encode(pipeline.tokenizer, passage_text(PASSAGES[1]))
    connector = pipeline.connector
    kv = torch.zeros(connector.layout.chunk_shape(len(ids)), dtype=connector.layout.dtype)
    # zeros: they would change the answer if they were used
    connector.kvstore.put(Entry.plain(connector.namespace.segment_key(ids), connector.layout, kv))
    question = "How tall is Mount Fuji?"
    fused = pipeline.answer(question, passages=[PASSAGES[1]])
    assert fused.reused_passages == 0 and fused.computed_passages == 0  # stored, but not usable
    full = pipeline.answer(question, passages=[PASSAGES[1]], method="full_prefill")
    assert fused.text == full.text


def test_a_question_longer_than_the_context_is_refused_by_name(pipeline):
    question = "why " * 8300
    with pytest.raises(ValueError, match="question is 83.. tokens, longer than the model's context of 8192"):
        pipeline.answer(question, passages=PASSAGES[:1])


def test_passages_and_kv_survive_a_restart_on_the_disk_tier(engine, tmp_path):
    config = StoreConfig(host_bytes=0, disk_path=str(tmp_path / "kv"), write_behind=False)
    rag = RagConfig(max_new_tokens=4, progress=False)
    with TieredStore(config) as disk:
        RagPipeline(engine, disk, config=rag, folder=tmp_path / "rag").ingest(DOCS)
    with TieredStore(config) as disk:
        again = RagPipeline(engine, disk, config=rag, folder=tmp_path / "rag")
        assert len(again.catalog) == 3
        answer = again.answer("Who designed the Eiffel Tower?", top_k=1)
        assert answer.reused_passages == 1 and answer.computed_passages == 0
        assert answer.passages == [again.select("Who designed the Eiffel Tower?", 1)[0].id]


def test_split_document_keeps_passages_within_the_token_budget(loaded):
    text = "\n\n".join(PASSAGES * 12)
    parts = split_document(loaded.tokenizer, text, SplitConfig(target_tokens=120, max_tokens=160))
    sizes = [len(encode(loaded.tokenizer, p)) for p in parts]
    assert len(parts) > 4 and max(sizes) <= 160
    assert sum(p.count("Eiffel Tower") for p in parts) == 12  # nothing lost, nothing repeated
    long_sentence = "word " * 700
    cut = split_document(loaded.tokenizer, long_sentence, SplitConfig(target_tokens=200, max_tokens=300))
    assert max(len(encode(loaded.tokenizer, p)) for p in cut) <= 300 + 2


@pytest.mark.parametrize(
    ("docs", "error", "match"),
    [
        ([{"text": "x", "author": "me"}], ValueError, "unknown fields"),
        ([{"title": "no text"}], ValueError, "no text"),
        ([42], TypeError, "str or a dict"),
    ],
)
def test_bad_documents_are_refused(pipeline, docs, error, match):
    with pytest.raises(error, match=match):
        pipeline.ingest(docs)
    assert len(pipeline.catalog) == 0


def test_bad_answer_arguments_are_refused(pipeline):
    with pytest.raises(ValueError, match="unknown passage id"):
        pipeline.answer("q?", passage_ids=["nope"])
    with pytest.raises(ValueError, match="method"):
        pipeline.answer("q?", passages=PASSAGES[:1], method="magic")
    with pytest.raises(ValueError, match="question"):
        pipeline.answer("  ", passages=PASSAGES[:1])
