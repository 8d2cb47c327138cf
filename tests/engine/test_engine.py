"""The layer-by-layer engine against the HF model's own forward and generate, on a real chat prompt."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttnCall, causal_attention
from engine.chat import build_chat
from engine.kvcache import KVCache
from engine.runner import LayerStep

# fp32 on CPU: the same kernels in the same order give identical logits; the tolerance leaves room for
# a different SDPA backend choice on other hardware.
LOGIT_ATOL = 1e-3

PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair.",
    "Mount Fuji is the highest mountain in Japan, about 3,776 metres tall, and an active volcano.",
]


@pytest.fixture(scope="module")
def prompt(loaded):
    return build_chat(loaded.tokenizer, "When was the Eiffel Tower completed?", PASSAGES)


@pytest.fixture(scope="module")
def hf_logits(loaded, prompt):
    with torch.inference_mode():
        return loaded.model(torch.tensor([prompt.ids])).logits


def test_logits_equal_hf(engine, prompt, hf_logits):
    out = engine.forward(prompt.ids, logits="all")
    assert out.logits.shape == hf_logits.shape
    assert (out.logits - hf_logits).abs().max().item() < LOGIT_ATOL
    assert len(out.cache) == len(prompt.ids)


def test_greedy_generation_equals_hf_generate(loaded, engine, prompt):
    ids = torch.tensor([prompt.ids])
    with torch.inference_mode():
        hf = loaded.model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    ours, cache = engine.generate(prompt.ids, 20)
    assert ours == hf
    assert len(cache) == len(prompt.ids) + len(ours) - 1  # the last token is emitted, not yet fed back


def test_start_from_given_kv(engine, prompt, hf_logits):
    """(a) A cache built from a stored chunk continues exactly like one long prefill."""
    cut = len(prompt.prefix) + len(prompt.passages[0])
    first = engine.forward(prompt.ids[:cut])
    chunk = first.cache.to_chunk()
    assert chunk.shape == (30, 2, cut, 3, 64)
    restored = KVCache.from_chunk(chunk.clone())
    out = engine.forward(prompt.ids[cut:], cache=restored, logits="all")
    assert (out.logits - hf_logits[:, cut:]).abs().max().item() < LOGIT_ATOL


def test_selected_rows_with_given_context(engine, prompt, hf_logits):
    """(b) Computing only the last row, against every layer's full context taken from a cache, is exact."""
    full = engine.forward(prompt.ids).cache
    n = len(prompt.ids)
    seen_rows = []

    def hook(step: LayerStep) -> None:
        layer = full.layers[step.layer]
        k, v = layer.k.clone(), layer.v.clone()
        k[:, :, step.q_index], v[:, :, step.q_index] = step.k, step.v
        step.k_ctx, step.v_ctx = k, v
        if step.layer == 0:
            step.keep = torch.tensor([n - 1])
        seen_rows.append(step.q.shape[2])

    out = engine.forward(prompt.ids, hook=hook)
    assert seen_rows == [n] + [1] * 29
    assert out.rows.tolist() == [n - 1]
    assert (out.logits[0, -1] - hf_logits[0, -1]).abs().max().item() < LOGIT_ATOL


def test_swap_attention_per_layer(engine, prompt, hf_logits):
    """(c) A per-layer attention function is called for that layer only and its output is used."""
    calls = []

    def spy(call: AttnCall) -> torch.Tensor:
        calls.append(call.layer)
        return causal_attention(call)

    same = engine.forward(prompt.ids, attention={5: spy})
    assert calls == [5]
    assert (same.logits[0, -1] - hf_logits[0, -1]).abs().max().item() < LOGIT_ATOL
    zeroed = engine.forward(prompt.ids, attention={5: lambda call: torch.zeros_like(call.q)})
    assert (zeroed.logits[0, -1] - hf_logits[0, -1]).abs().max().item() > 1e-2


def test_bad_token_input_is_refused(engine):
    with pytest.raises(ValueError, match="non-empty"):
        engine.forward([])
    with pytest.raises(ValueError, match="49152"):
        engine.forward([1, 49152])
    with pytest.raises(TypeError, match="float"):
        engine.forward(torch.tensor([1.0, 2.0]))


def test_positions_beyond_context_are_refused(engine):
    with pytest.raises(ValueError, match="8192"):
        engine.forward([1, 2], positions=torch.tensor([8191, 8192]))


def test_decode_appends_into_spare_room(engine, prompt):
    """Decoding writes rows into a buffer with room instead of copying the cache every step."""
    out = engine.forward(prompt.ids)
    layer = out.cache.layers[0]
    engine.forward([42], cache=out.cache)
    first_ptr = layer.k.data_ptr()
    for token in (43, 44, 45):
        engine.forward([token], cache=out.cache)
    assert layer.k.data_ptr() == first_ptr  # no reallocation for a few tokens
    assert layer.length == len(prompt.ids) + 4 == len(out.cache)
    layer.replace(layer.k.clone(), layer.v.clone())  # a caller may swap the tensors; update still works
    k, _ = layer.update(layer.k[..., -1:, :], layer.v[..., -1:, :])
    assert k.shape[-2] == len(prompt.ids) + 5
    assert torch.equal(k[..., -1, :], k[..., -2, :])
