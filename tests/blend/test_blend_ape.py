"""APE: one context with T = S = 1 is sequential prefill; several contexts share positions; the merge."""

from __future__ import annotations

import math

import pytest
import torch
from blend_cases import LOGIT_ATOL, PASSAGES, QUESTION, kl

from blend.ape import APEAttention, APEConfig
from blend.segments import encode_segment
from engine.attention import AttnCall
from engine.chat import ChatPrompt, build_chat
from engine.kvcache import KVCache


def test_one_context_with_t_s_one_equals_sequential_prefill(engine, fuser, loaded):
    prompt = build_chat(loaded.tokenizer, QUESTION, PASSAGES[:1])
    full = engine.forward(prompt.ids).logits[0, -1]
    out = fuser.fuse(prompt, "parallel")
    assert (out.logits - full).abs().max().item() < LOGIT_ATOL
    ape = fuser.fuse(prompt, "ape", ape_config=APEConfig(1.0, 1.0))
    assert (ape.logits - full).abs().max().item() < LOGIT_ATOL
    tokens, _ = engine.decode(out.logits, out.cache, 8)
    assert tokens == engine.generate(prompt.ids, 8)[0]


def test_contexts_share_positions_and_plain_parallel_is_one_softmax(engine, fuser, prompt):
    """T = S = 1 over several contexts equals a hand-built cache (each context encoded alone behind the
    prefix, all at positions |P|..) read by ordinary causal attention: one softmax over every key."""
    p = len(prompt.prefix)
    cache = engine.forward(prompt.prefix).cache
    prefix = cache.clone()
    for ids in prompt.passages:
        kv, positions = encode_segment(engine, prefix, ids)
        assert positions.tolist() == list(range(p, p + len(ids)))
        seg = KVCache.from_chunk(kv, positions)
        for layer, part in zip(cache.layers, seg.layers, strict=True):
            layer.update(part.k, part.v)
        cache.append_positions(positions)
    longest = max(map(len, prompt.passages))
    reference = engine.forward(prompt.question, cache=cache)  # starts at next_position = p + longest
    out = fuser.fuse(prompt, "parallel")
    assert (out.logits - reference.logits[0, -1]).abs().max().item() < LOGIT_ATOL
    q = len(prompt.question)
    assert out.cache.positions[-q:].tolist() == list(range(p + longest, p + longest + q))
    assert int(out.cache.positions.max()) + 1 < len(prompt.ids)  # shorter than the sequential prompt


def test_temperature_and_scale_change_the_result(fuser, prompt, full_logits):
    plain = fuser.fuse(prompt, "parallel")
    ape = fuser.fuse(prompt, "ape")  # T = S = 0.9
    assert (plain.logits - ape.logits).abs().max().item() > 1e-2
    assert (
        ape.reused_passages == len(prompt.passages)
        and ape.stats.recomputed[1:] == [len(prompt.question)] * 29
    )
    assert math.isfinite(kl(full_logits, ape.logits))


def brute_force(q, k, v, q_index, start, end, t, s, scale):
    """APE's merge written out per query row and head, in float64, from the formulas in the spec."""
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[1:], dtype=torch.float64)
    for h in range(heads):
        kh, vh = k[0, h // group].double(), v[0, h // group].double()
        for i in range(q.shape[2]):
            scores = (kh @ q[0, h, i].double()) * scale
            ctx = [j for j in range(k.shape[2]) if start <= j < end]
            other = [j for j in range(k.shape[2]) if not start <= j < end and j <= int(q_index[i])]
            lse_c = torch.logsumexp(scores[ctx] / t, 0)
            lse_o = torch.logsumexp(scores[other], 0)
            o_c = torch.softmax(scores[ctx] / t, 0) @ vh[ctx]
            o_o = torch.softmax(scores[other], 0) @ vh[other]
            w = torch.softmax(torch.stack([s * t * lse_c, lse_o]), 0)
            out[h, i] = w[0] * o_c + w[1] * o_o
    return out


def test_merge_matches_the_formula_with_gqa_and_causal_question_rows():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 3, 8, generator=gen)
    k, v = torch.randn(1, 2, 12, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen)
    q_index = torch.tensor([9, 10, 11])  # prefix 0..2, contexts 3..8, question 9..11
    fn = APEAttention(3, 9, APEConfig(0.7, 0.8))
    got = fn(AttnCall(0, q, k, v, q_index, q_index, 0.35))
    want = brute_force(q, k, v, q_index, 3, 9, 0.7, 0.8, 0.35)
    assert torch.allclose(got[0].double(), want, atol=1e-5)


def test_ape_attention_refuses_rows_inside_the_contexts():
    fn = APEAttention(3, 9, APEConfig())
    call = AttnCall(
        0,
        torch.randn(1, 2, 1, 8),
        torch.randn(1, 2, 9, 8),
        torch.randn(1, 2, 9, 8),
        torch.tensor([5]),
        torch.tensor([5]),
        0.3,
    )
    with pytest.raises(ValueError, match="index >= 9"):
        fn(call)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"scale": -1.0}, {"temperature": "hot"}])
def test_bad_ape_config_is_refused(kwargs):
    with pytest.raises(ValueError, match="APEConfig"):
        APEConfig(**kwargs)


def test_generated_tokens_attend_like_the_question(engine, fuser, prompt):
    """APE's merge holds for the generated tokens too: decoding with `decode_attention` gives what fusing
    the question plus those tokens in one go gives; plain causal decoding (T = S = 1 there) does not."""
    ape = fuser.fuse(prompt, "ape")
    tokens, _ = engine.decode(ape.logits, ape.cache.clone(), 4, ape.decode_attention, stop=set())
    logits, plain, cache, plain_cache = ape.logits, ape.logits, ape.cache.clone(), ape.cache.clone()
    for t in tokens[:3]:
        logits = engine.forward([t], cache=cache, attention=ape.decode_attention).logits[0, -1]
        plain = engine.forward([t], cache=plain_cache).logits[0, -1]
    longer = ChatPrompt(prompt.prefix, prompt.passages, prompt.question + tokens[:3])
    again = fuser.fuse(longer, "ape")
    assert (again.logits - logits).abs().max().item() < LOGIT_ATOL
    assert int(logits.argmax()) == tokens[3]
    assert (plain - logits).abs().max().item() > 1e-2
