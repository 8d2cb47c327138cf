"""CacheBlend, full reuse and prefix caching on the real model, against independently built references."""

from __future__ import annotations

import pytest
import torch
from blend_cases import LOGIT_ATOL, kl

from blend.cacheblend import BlendConfig, blend, make_feed, mask_attention
from blend.rope import RopeShift
from blend.segments import Placed, encode_segment
from engine.attention import AttnCall
from engine.kvcache import KVCache


def full_reuse_reference(engine, prompt):
    """Prefix KV, then each passage computed alone behind the prefix and rotated to its place, then the
    question computed over that cache: full reuse built by hand, without the blend code path."""
    rope = RopeShift.for_engine(engine)
    cache = engine.forward(prompt.prefix).cache
    prefix = cache.clone()
    for (start, end), ids in zip(prompt.spans()[1:-1], prompt.passages, strict=True):
        kv, old = encode_segment(engine, prefix, ids)
        seg = KVCache.from_chunk(kv, old)
        for layer, part in zip(cache.layers, seg.layers, strict=True):
            layer.update(rope.move(part.k, old, torch.arange(start, end)), part.v)
        cache.append_positions(torch.arange(start, end))
    return engine.forward(prompt.question, cache=cache).logits[0, -1]


def test_ratio_one_equals_full_prefill(fuser, prompt, full_logits):
    out = fuser.fuse(prompt, "cacheblend", BlendConfig(ratio=1.0))
    assert out.computed_passages == len(prompt.passages)  # nothing was stored: computed, not an error
    assert (out.logits - full_logits).abs().max().item() < LOGIT_ATOL
    rows = len(prompt.ids) - len(prompt.prefix)
    assert out.stats.recomputed == [rows] * 30


def test_ratio_zero_without_check_layer_equals_full_reuse(engine, fuser, prompt, full_logits):
    reference = full_reuse_reference(engine, prompt)
    out = fuser.fuse(prompt, "cacheblend", BlendConfig(ratio=0.0, check_layers=()))
    assert (out.logits - reference).abs().max().item() < LOGIT_ATOL
    assert out.stats.recomputed[1:] == [len(prompt.question)] * 29
    named = fuser.fuse(prompt, "full_reuse")
    assert torch.equal(named.logits, out.logits)
    assert named.reused_passages == len(prompt.passages) and named.computed_passages == 0
    # and full reuse really is an approximation here, so the test above can tell the two apart
    assert (reference - full_logits).abs().max().item() > 10 * LOGIT_ATOL


def test_selective_recompute_is_between_reuse_and_prefill(fuser, prompt, full_logits):
    reuse = fuser.fuse(prompt, "full_reuse")
    cb = fuser.fuse(prompt, "cacheblend", BlendConfig(ratio=0.3))
    cached = sum(map(len, prompt.passages))
    assert cb.stats.cached_rows == cached
    assert len(cb.stats.selected) == int(0.3 * cached + 0.5) + len(prompt.question)
    assert cb.stats.recomputed[0] == cb.stats.recomputed[1] == cb.stats.rows  # layers 0 and 1 are full
    assert kl(full_logits, cb.logits) < kl(full_logits, reuse.logits)


def test_a_prompt_that_is_all_cached_prefix_equals_prefix_caching(
    engine, fuser, connector, prompt, full_logits
):
    """Stored exact KV of the whole prompt is used as is: one row computed, logits of a full prefill."""
    exact = engine.forward(prompt.ids).cache
    connector.store(prompt.ids, exact.to_chunk(), exact.positions)
    out = fuser.fuse(prompt, "cacheblend")
    assert out.prefix_tokens == len(prompt.ids) - 1
    assert out.stats.recomputed == [1] * 30
    assert (out.logits - full_logits).abs().max().item() < LOGIT_ATOL


def test_decoding_continues_from_the_fused_cache(engine, fuser, prompt):
    full_tokens, _ = engine.generate(prompt.ids, 12)
    out = fuser.fuse(prompt, "cacheblend", BlendConfig(ratio=1.0))
    assert len(out.cache) == len(prompt.ids)
    tokens, _ = engine.decode(out.logits, out.cache, 12)
    assert tokens == full_tokens


@pytest.mark.parametrize("mask", ["exact", "bottom_right"])
def test_exact_mask_never_lets_a_row_see_a_later_one(engine, fuser, prompt, mask):
    """In a real blend run, the first recomputed row of every layer is attended again with every later
    key's value scrambled: under the exact mask its output cannot change; the official bottom-right mask
    (which aligns the selected rows to the last keys) lets mid-sequence rows see later keys, so it does."""
    fn = mask_attention(mask)
    changes = []

    def spy(call: AttnCall) -> torch.Tensor:
        out = fn(call)
        first = int(call.q_index[0])
        v = call.v.clone()
        v[:, :, first + 1 :] = torch.randn_like(v[:, :, first + 1 :]) * 10
        scrambled = fn(AttnCall(call.layer, call.q, call.k, v, call.q_index, call.q_positions, call.scale))
        changes.append((scrambled[:, :, 0] - out[:, :, 0]).abs().max().item())
        return out

    fuser._ensure(prompt)
    prefix = fuser.prefix_cache(prompt.prefix, len(prompt.prefix))
    placed = [Placed(s, ids) for (s, _), ids in zip(prompt.spans()[1:-1], prompt.passages, strict=True)]
    feed = make_feed(engine, fuser.connector, placed, len(prefix), len(prompt.ids) - len(prefix))
    out = blend(engine, prompt.ids, prefix, feed, BlendConfig(ratio=0.15, mask=mask), attention=spy)
    assert int(out.stats.selected[0]) < len(prompt.ids) - len(prompt.question)  # a mid-sequence row
    assert len(changes) == 29  # layers 1..29 (layer 0 is a plain prefill)
    if mask == "exact":
        assert max(changes) == 0.0
    else:
        assert min(changes) > 1e-3


def test_gradual_filtering_narrows_the_selection(fuser, prompt):
    out = fuser.fuse(prompt, "cacheblend", BlendConfig(ratio=(0.4, 0.1), check_layers=(1, 4)))
    rec = out.stats.recomputed
    assert rec[0] == rec[1] > rec[2] == rec[4] > rec[5] == rec[29]
    assert rec[5] == int(0.1 * out.stats.cached_rows + 0.5) + len(prompt.question)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": 0.2, "check_layers": ()}, "ratio must be 0"),
        ({"check_layers": (3, 1)}, "increasing"),
        ({"deviation": "q"}, "deviation"),
        ({"mask": "causal"}, "mask"),
        ({"ratio": (0.1, 0.3), "check_layers": (1, 2)}, "not increase"),
        ({"ratio": (0.1, 0.05)}, "2 ratios for 1"),
    ],
)
def test_bad_blend_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlendConfig(**kwargs)


def test_check_layer_beyond_the_model_is_refused(fuser, prompt):
    with pytest.raises(ValueError, match="check layer 30"):
        fuser.fuse(prompt, "cacheblend", BlendConfig(check_layers=(30,)))


def test_unknown_method_is_refused(fuser, prompt):
    with pytest.raises(ValueError, match="'magic'"):
        fuser.fuse(prompt, "magic")
