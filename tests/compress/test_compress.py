"""Compressors on the real model: exactness where the math says so, real bytes, decoding, storage."""

from __future__ import annotations

import math

import pytest
import torch

from compress import (
    REGISTRY,
    Chelsea,
    KVPressThinK,
    SnapKV,
    StreamingLLM,
    ThinK,
    attend,
    compress_cache,
    compressing,
    compressor_for,
    from_entry,
    kv_bytes,
    kv_ratio,
    observe,
    prefill,
    to_entry,
)
from compress.evaluate import nq_passages, tokens_of
from compress.think import ThinKLayer
from compress.tokenset import TokenSetLayer
from engine.attention import AttnCall, causal_attention
from engine.kvcache import KVCache, LayerKV
from kvstore.layout import KVLayout
from kvstore.store import TieredStore
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

ATOL = 2e-4  # fp32 on CPU; the compressed path splits the softmax into parts, SDPA fuses it


@pytest.fixture(scope="module")
def text_ids(engine, shared_data):
    """About 230 tokens of real Wikipedia text and 6 continuation tokens."""
    text = " ".join(nq_passages(shared_data, 6, seed=3))
    ids = tokens_of(engine, text)
    assert len(ids) > 240
    return ids[:230], ids[230:236]


@pytest.fixture(scope="module")
def full_logits(engine, text_ids):
    prompt, cont = text_ids
    return engine.forward(prompt + cont, logits="all").logits[0, len(prompt) - 1 :]


def continue_logits(engine, cache: KVCache, cont: list[int], attention=attend) -> torch.Tensor:
    """Logits of the prompt's last row's successors: the continuation as one forward, then 2 decode steps."""
    first = engine.forward(cont[:-2], cache=cache, attention=attention, logits="all").logits[0]
    rows = [first]
    for token in cont[-2:]:
        rows.append(engine.forward([token], cache=cache, attention=attention).logits[0])
    return torch.cat(rows)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "compressor",
    [ThinK(lam=0.0), Chelsea(keep=1.0, chunk=16), Chelsea(keep=1.0, chunk=16, protect=0.5)],
    ids=["think0", "chelsea1", "chelsea1_protect"],
)
def test_no_compression_equals_full_cache(engine, text_ids, full_logits, compressor):
    prompt, cont = text_ids
    out = prefill(engine, prompt, compressor)
    assert max_diff(out.logits[0, -1], full_logits[0]) < ATOL  # the prompt's own attention is exact
    logits = continue_logits(engine, out.cache, cont)
    assert max_diff(logits, full_logits[1:]) < ATOL
    assert out.cache.next_position == len(prompt) + len(cont)


def test_positions_continue_at_original_length(engine, text_ids):
    prompt, cont = text_ids
    cache = prefill(engine, prompt, Chelsea(keep=0.25, chunk=16)).cache
    held = cache.layers[0].length
    assert held < len(prompt) / 2  # far fewer tokens held than covered ...
    assert cache.next_position == len(prompt)  # ... yet the next token sits at the original length
    seen = []
    engine.forward([cont[0]], cache=cache, attention=attend, hook=lambda step: seen.append(step.positions))
    assert seen[0].tolist() == [len(prompt)]


def test_think_gather_equals_zero_filled_reference(engine, text_ids):
    prompt, cont = text_ids
    think = prefill(engine, prompt, ThinK(lam=0.5)).cache
    layer = think.layers[3]
    assert isinstance(layer, ThinKLayer)
    assert layer.k_pruned.shape == (1, 3, len(prompt) - 32, 32)  # a genuinely narrower tensor
    zeroed = KVCache([LayerKV(lay.zero_filled(), lay.v) for lay in think.layers], think.positions.clone())
    ours = continue_logits(engine, think, cont)
    reference = continue_logits(engine, zeroed, cont, attention=causal_attention)
    assert max_diff(ours, reference) < ATOL


def test_think_bytes_equal_the_formula(engine, text_ids, tmp_path):
    prompt, _ = text_ids
    spec = engine.spec
    think = ThinK(lam=0.4)
    cache = prefill(engine, prompt, think).cache
    t, w, d, h, layers = len(prompt), think.window, spec.head_dim, spec.num_kv_heads, spec.num_layers
    kept = d - int(d * 0.4)
    assert kept == 39
    # fp32 keys and values, one byte per kept channel number (uint8: an int64 index was 8x that)
    per_layer = h * ((t - w) * kept * 4 + kept + w * d * 4 + t * d * 4)
    assert all(lay.channels.dtype == torch.uint8 for lay in cache.layers)
    assert kv_bytes(cache) == (layers * per_layer, t * spec.kv_bytes_per_token)
    assert kv_ratio(cache) < 1 - 0.2 * (t - w) / t + 0.01
    entry = to_entry("k" * 32, cache, KVLayout.for_spec(spec), think)
    assert entry.nbytes == layers * per_layer + t * 8  # tensors + int64 positions
    store = TieredStore(tiers=[HostTier(1 << 30)])
    store.put(entry)
    pad = -(layers * h * kept) % 8  # the host pool rounds each tensor up to 8 bytes; only the index needs it
    assert store.stats()["tiers"]["host"]["bytes"] == entry.nbytes + pad


def test_chelsea_bytes_equal_the_formula(engine, text_ids):
    prompt, _ = text_ids
    spec = engine.spec
    chelsea = Chelsea(keep=0.25, chunk=16, sinks=4, recent=32)
    cache = prefill(engine, prompt, chelsea).cache
    t = len(prompt)
    chunks = (t - 4 - 32) // 16
    kept = 4 + chunks * 4  # sinks + 4 of every 16-token chunk
    tail = t - 4 - chunks * 16
    per_layer = spec.num_kv_heads * (kept * spec.head_dim * 4 * 2 + kept * 4 + tail * spec.head_dim * 4 * 2)
    assert kv_bytes(cache)[0] == spec.num_layers * per_layer
    layer = cache.layers[0]
    assert isinstance(layer, TokenSetLayer)
    assert layer.size.sum(-1).tolist() == [[kept - 4 + chunks * 12 + 4] * 3]  # sizes account every token


def test_identical_merged_keys_give_exact_attention_when_size_aware(engine, text_ids):
    """Keys duplicated in pairs merge into their twin: `+ log m` makes that exactly full attention."""
    prompt, cont = text_ids
    out, _ = observe(engine, prompt)
    full = out.cache.layers[7]
    k, v = full.k.clone(), full.v.clone()
    k[:, :, 1::2] = k[:, :, 0::2][:, :, : k[:, :, 1::2].shape[2]]  # key 2i+1 = key 2i; values differ
    q = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(0)) * 2
    t = k.shape[2]
    call = AttnCall(7, q, k, v, torch.tensor([t - 1]), torch.tensor([t - 1]), 64**-0.5)
    exact = causal_attention(call)
    outs = {}
    for aware in (True, False):
        layer = Chelsea(keep=0.5, chunk=16, sinks=4, recent=32, size_aware=aware).compress(
            None, None, k, v, None, {}
        )
        assert layer.size.max() == 2
        outs[aware] = layer.attend(
            AttnCall(7, q, layer.k, layer.v, call.q_index, call.q_positions, call.scale, layer)
        )
    assert max_diff(outs[True], exact) < 1e-5
    assert max_diff(outs[False], exact) > 1e-3  # plain attention under-weights the merged pairs


def test_per_head_lengths_are_masked(engine, text_ids):
    """Heads holding different numbers of tokens (padded with size 0) attend exactly over their own."""
    prompt, _ = text_ids
    out, _ = observe(engine, prompt[:80])
    k, v = out.cache.layers[2].k, out.cache.layers[2].v
    keep = [torch.arange(0, 48), torch.arange(0, 48, 2), torch.arange(10, 40)]  # per head, before the tail
    longest = max(len(i) for i in keep)
    k_set = torch.zeros(1, 3, longest, 64)
    v_set, size = torch.zeros_like(k_set), torch.zeros(1, 3, longest)
    for h, idx in enumerate(keep):
        k_set[0, h, : len(idx)], v_set[0, h, : len(idx)], size[0, h, : len(idx)] = (
            k[0, h, idx],
            v[0, h, idx],
            1,
        )
    layer = TokenSetLayer(k=k[:, :, 48:], v=v[:, :, 48:], k_set=k_set, v_set=v_set, size=size, total=80)
    q = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(1))
    got = layer.attend(AttnCall(2, q, layer.k, layer.v, torch.tensor([80]), torch.tensor([80]), 0.125, layer))
    for h, idx in enumerate(keep):
        rows = torch.cat([idx, torch.arange(48, 80)])
        sub = AttnCall(
            2,
            q[:, 3 * h : 3 * h + 3],
            k[:, h : h + 1, rows],
            v[:, h : h + 1, rows],
            torch.tensor([80]),
            None,
            0.125,
        )
        assert max_diff(got[:, 3 * h : 3 * h + 3], causal_attention(sub)) < 1e-5


def test_chelsea_merges_chunks_leaving_the_window_during_decode(engine, text_ids):
    prompt, cont = text_ids
    chelsea = Chelsea(keep=0.25, chunk=8, sinks=4, recent=8)
    cache = prefill(engine, prompt[:60], chelsea).cache
    before = cache.layers[0].k_set.shape[2]
    engine.forward(prompt[60:90], cache=cache, attention=attend)  # 30 new rows: causal among themselves
    for token in prompt[90:100]:
        engine.forward([token], cache=cache, attention=attend)
    layer = cache.layers[0]
    assert layer.total == 100 and len(cache) == 100
    assert layer.k.shape[2] < 8 + 8 + 8  # the tail never keeps more than recent + one chunk (+ last rows)
    assert layer.k_set.shape[2] > before and layer.size.sum(-1).eq(100 - layer.k.shape[2]).all()


def test_prefill_hook_equals_offline_compression(engine, text_ids):
    prompt, cont = text_ids
    think = ThinK(lam=0.4)
    with compressing(engine, think) as press:
        engine.forward(prompt, cache=press.cache, hook=press)
    out, seen = observe(engine, prompt)
    offline = compress_cache(engine, out.cache, think, seen)
    recomputed = compress_cache(engine, out.cache, think, ids=prompt)  # as for a chunk loaded from a store
    for a, b, c in zip(press.cache.layers, offline.layers, recomputed.layers, strict=True):
        assert torch.equal(a.channels, b.channels) and torch.equal(a.channels, c.channels)
        assert max_diff(a.k_pruned, c.k_pruned) == 0
    assert isinstance(out.cache.layers[0], LayerKV) and out.cache.layers[0].k.shape[2] == len(prompt)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_decodes_and_reports_its_bytes(engine, text_ids, full_logits, method):
    prompt, cont = text_ids
    compressor = compressor_for(method)
    out = prefill(engine, prompt, compressor)
    ratio = kv_ratio(out.cache)
    if method == "kvpress_think":
        assert ratio == 1.0  # zeroes channels, keeps the shape
    else:
        assert 0 < ratio < 0.9
    logits = continue_logits(engine, out.cache, cont)  # a 4-row forward, then 2 one-token steps
    assert out.cache.next_position == len(prompt) + len(cont)
    assert torch.isfinite(logits).all()
    agree = (logits.argmax(-1) == full_logits[1:].argmax(-1)).float().mean()
    assert agree >= 0.5  # every method keeps most next-token choices on real text


@pytest.mark.parametrize(
    "compressor",
    [
        ThinK(lam=0.4),
        Chelsea(keep=0.25, chunk=16),
        Chelsea(keep=0.25, chunk=16, protect=0.25),
        SnapKV(keep=0.3),
    ],
    ids=["think", "chelsea", "chelsea_protect", "snapkv"],
)
def test_compressed_chunk_round_trips_through_the_disk_tier(engine, text_ids, tmp_path, compressor):
    prompt, cont = text_ids
    cache = prefill(engine, prompt, compressor).cache
    plain = KVLayout.for_spec(engine.spec)
    entry = to_entry("c0ffee" * 6, cache, plain, compressor)
    assert entry.layout.method == compressor.method and dict(entry.layout.params) == compressor.params()
    DiskTier(tmp_path, 1 << 30).put(entry)
    loaded = DiskTier(tmp_path, 1 << 30).get(entry.key)  # a fresh tier: rebuilt from the files
    assert loaded is not None and loaded.nbytes == entry.nbytes
    restored = from_entry(loaded)
    assert kv_bytes(restored) == kv_bytes(cache)
    assert entry.nbytes < 0.9 * plain.chunk_nbytes(len(prompt))
    expected = continue_logits(engine, cache, cont)
    assert max_diff(continue_logits(engine, restored, cont), expected) == 0


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: ThinK(lam=-0.1), "lam"),
        (lambda: ThinK(lam=1.0), "lam"),
        (lambda: Chelsea(keep=-0.5), "keep"),
        (lambda: Chelsea(keep=0.0), "keep"),
        (lambda: Chelsea(keep=1.5), "keep"),
        (lambda: Chelsea(keep=0.01, chunk=32), "keep"),  # rounds to 0 tokens per chunk
        (lambda: Chelsea(protect=1.5), "protect"),
        (lambda: Chelsea(protect=-0.1), "protect"),
        (lambda: StreamingLLM(keep=0.0), "keep"),
        (lambda: SnapKV(keep=1.2), "keep"),
        (lambda: KVPressThinK(lam=1.0), "lam"),
    ],
)
def test_bad_ratio_is_refused_by_name(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_inputs_name_what_is_wrong(engine, text_ids):
    prompt, _ = text_ids
    with pytest.raises(ValueError, match="unknown compression method 'zip'"):
        compressor_for("zip")
    with pytest.raises(ValueError, match="unknown chelsea parameters"):
        compressor_for("chelsea", {"ratio": 0.5})
    plain = engine.forward(prompt[:20]).cache
    with pytest.raises(TypeError, match="LayerKV"):
        to_entry("k" * 32, plain, KVLayout.for_spec(engine.spec), ThinK())
    with pytest.raises(ValueError, match="observation"):
        compress_cache(engine, plain, ThinK())
    compressed = prefill(engine, prompt[:40], Chelsea(chunk=8)).cache
    with pytest.raises(TypeError, match="plain cache"), compressing(engine, ThinK(), compressed):
        pass
    with pytest.raises(ValueError, match="observation"):
        compress_cache(engine, plain, Chelsea(chunk=8, protect=0.25))  # protect scores with the last queries
    longer = engine.forward(prompt[:80]).cache.layers[0]  # 44 tokens to merge: 5 chunks of 8
    with pytest.raises(ValueError, match="queries"):
        Chelsea(chunk=8, protect=0.25).compress(None, None, longer.k, longer.v, None, {})


def test_kvpress_think_zeroes_exactly_the_channels_think_drops(engine, text_ids):
    """kvpress's ThinKPress (installed, or its transcription) ranks channels as ours does, but zeroes them."""
    prompt, _ = text_ids
    out, seen = observe(engine, prompt)
    zeroed = compress_cache(engine, out.cache, KVPressThinK(lam=0.4), seen)
    think = compress_cache(engine, out.cache, ThinK(lam=0.4), seen)
    for z, t, full in zip(zeroed.layers, think.layers, out.cache.layers, strict=True):
        assert z.k.shape == full.k.shape  # no bytes saved
        dropped = z.k[0].eq(0).all(dim=1)  # [heads, dim]: channels zero at every token
        kept = torch.zeros_like(dropped)
        kept.scatter_(1, t.channels[0].long(), True)
        assert torch.equal(dropped, ~kept)


def test_bench_baselines_hold_the_same_bytes_as_the_method_they_match(engine, text_ids):
    from compress.bench import compressed_caches

    prompt, _ = text_ids
    out, seen = observe(engine, prompt)
    caches = compressed_caches(engine, out.cache, seen)
    held = {name: b for name, (_, _, b) in caches.items()}
    assert held["full"] == len(prompt) * engine.spec.kv_bytes_per_token
    for name, b in held.items():
        if "@" in name:
            target = held[name.split("@")[1]]
            per_token = engine.spec.kv_bytes_per_token
            assert abs(b - target) <= per_token, name  # within one token's KV
        if "_protect" in name:
            assert b == held[name.split("_protect")[0]], name  # exactly plain Chelsea's bytes at that keep
    assert held["think_0.4"] < 0.85 * held["full"] and held["chelsea_0.25"] < 0.5 * held["full"]


def _merge_by_hand(
    keys: torch.Tensor, target: int, per_pass: float, frozen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The passes written plainly for one head's chunks `[n, c, d]`, one edge at a time; `frozen`
    `[n, c]` tokens stay as they are and are left out of the A/B alternation."""
    n, c = keys.shape[:2]
    frozen = torch.zeros(n, c, dtype=torch.bool) if frozen is None else frozen
    chunks = [[[i, keys[j, i], 1.0, bool(frozen[j, i])] for i in range(c)] for j in range(n)]
    total = n * target
    while (count := sum(len(ch) for ch in chunks)) > total:
        edges = []  # (similarity, chunk, a, b)
        for ch in chunks:
            free = [x for x in ch if not x[3]]
            a_side, b_side = free[0::2], free[1::2]
            for a in a_side if b_side else []:
                sims = torch.stack([torch.cosine_similarity(a[1], b[1], dim=0) for b in b_side])
                edges.append((float(sims.max()), ch, a, b_side[int(sims.argmax())]))
        edges.sort(key=lambda e: -e[0])
        r = min(count - total, max(1, math.ceil(per_pass * len(edges))))
        for _, ch, a, b in edges[:r]:
            b[1], b[2] = (b[1] * b[2] + a[1] * a[2]) / (b[2] + a[2]), b[2] + a[2]
            ch.remove(a)
    items = [x for ch in chunks for x in ch]
    return torch.stack([x[1] for x in items]), torch.tensor([x[2] for x in items], dtype=keys.dtype)


@pytest.mark.parametrize("target", [8, 4, 3])
@pytest.mark.parametrize("per_pass", [0.25, 1.0])
@pytest.mark.parametrize("protect", [False, True])
def test_merge_passes_match_a_plain_implementation(target, per_pass, protect):
    from compress.chelsea import merge_chunks

    gen = torch.Generator().manual_seed(target)
    k = torch.randn(3, 4, 16, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 4, 16, 8, generator=gen, dtype=torch.float64)
    frozen = None
    if protect:  # each row's 4 * (target - 1) protected tokens, spread unevenly over its chunks
        score = torch.rand(3, 4 * 16, generator=gen) * torch.linspace(1, 3, 4 * 16)
        frozen = torch.zeros(3, 4 * 16, dtype=torch.bool)
        frozen.scatter_(1, score.topk(4 * (target - 1), dim=1).indices, True)
        frozen = frozen.view(3, 4, 16)
    keys, _, sizes = merge_chunks(k, v, target, per_pass, frozen)
    assert keys.shape == (3, 4 * target, 8)
    for n in range(3):
        by_hand, by_hand_sizes = _merge_by_hand(k[n], target, per_pass, None if frozen is None else frozen[n])
        assert torch.allclose(keys[n], by_hand) and torch.equal(sizes[n], by_hand_sizes)
        if frozen is not None:  # every protected key survives as it was, alone
            for j, i in frozen[n].nonzero().tolist():
                at = (keys[n] == k[n, j, i]).all(-1).nonzero()
                assert at.numel() == 1 and sizes[n, at[0, 0]] == 1


def test_protected_tokens_are_what_the_window_attends_to_and_keep_the_bytes(engine, text_ids):
    """protect keeps each head's top observation-scored tokens unmerged at exactly plain Chelsea's bytes."""
    from compress.snapkv import pool, window_attention

    prompt, _ = text_ids
    out, seen = observe(engine, prompt)
    plain = Chelsea(keep=0.25, chunk=16)
    protect = Chelsea(keep=0.25, chunk=16, protect=0.5)
    assert protect.observation_rows() == 32 and plain.observation_rows() == 0
    assert "protect" not in plain.params() and protect.params()["protect"] == 0.5  # plain layouts unchanged
    ours, theirs = compress_cache(engine, out.cache, protect, seen), compress_cache(engine, out.cache, plain)
    assert kv_bytes(ours) == kv_bytes(theirs)
    t, chunks = len(prompt), (len(prompt) - 4 - 32) // 16
    for i in (0, 15, 29):
        k = out.cache.layers[i].k
        score = pool(window_attention(seen[i].queries, k)[..., 4 : 4 + chunks * 16], 7)
        count = int(0.5 * chunks * 4 + 0.5)
        layer = ours.layers[i]
        assert layer.total == t and layer.size.sum(-1).eq(4 + chunks * 16).all()
        for h in range(3):
            best = score[0, h].topk(count).indices + 4
            kept = (layer.k_set[0, h][:, None, :] == k[0, h, best][None]).all(-1)  # [slots, count]
            assert kept.any(0).all()  # every protected token is held as it was ...
            assert layer.size[0, h][kept.any(1)].eq(1).all()  # ... standing for itself only


def test_protect_keeps_the_passkey_that_plain_chelsea_merges_away(engine, shared_data):
    """A 512-token haystack, question in the prompt: the full cache and protected Chelsea find the key;
    plain Chelsea at the same bytes merges its digits (README, Compression)."""
    from compress.evaluate import found, passkey_trials

    filler = nq_passages(shared_data, 200, seed=0)
    trial = passkey_trials(engine, filler, 512, [0.5], 1, seed=0)[0]
    out, seen = observe(engine, trial.context + trial.question)
    got = {}
    for name, c in {"plain": Chelsea(keep=0.25), "protect": Chelsea(keep=0.25, protect=0.25)}.items():
        cache = compress_cache(engine, out.cache, c, seen)
        new, _ = engine.decode(out.logits[0, -1], cache, 6, attention=attend, stop=set())
        got[name] = (found(engine.tokenizer.decode(new), trial.key), kv_bytes(cache))
    full, _ = engine.decode(out.logits[0, -1], out.cache, 6, stop=set())
    assert found(engine.tokenizer.decode(full), trial.key)
    assert got["protect"][0] and not got["plain"][0]
    assert got["protect"][1] == got["plain"][1]


def test_bench_runs_end_to_end_on_a_short_text(engine, shared_data, tmp_path):
    """The benchmark's own code path (tiny size): every setting reported, the plot written."""
    from compress.bench import BenchConfig, plot, run, settings

    report = run(engine, BenchConfig(lengths=[128], continuation=4, depths=[0.5], keys=1, timed_steps=1))
    names = [r["setting"] for r in report["results"]]
    assert names == [s.name for s in settings()]
    full = report["results"][0]
    assert full["kl"] == 0 and full["top1"] == 1 and full["kv_ratio"] == 1
    assert all(0 < r["kv_ratio"] <= 1 and r["passkey"] in (0.0, 1.0) for r in report["results"])
    assert set(report["targets"]["128"]) >= {"think_ok", "chelsea_ok", "ceiling"}
    plot(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="lengths"):
        BenchConfig(lengths=[64])


def test_bench_only_runs_the_named_settings_and_what_they_match():
    from compress.bench import BenchConfig

    config = BenchConfig(only=["think_0.4", "snapkv@chelsea_0.25"])
    assert config.wanted() == {"full", "think_0.4", "snapkv@chelsea_0.25", "chelsea_0.25"}
    assert BenchConfig().wanted() is None
    with pytest.raises(ValueError, match="unknown settings \\['chelsea_9'\\]"):
        BenchConfig(only=["chelsea_9"])
