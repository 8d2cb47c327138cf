"""The cache end to end: real embedder, real Redis, real hnswlib."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import redis

from semcache.categories import Category
from semcache.store import StoreUnavailable

Q = "What is cognitive dissonance?"


def test_paraphrase_hits_and_unrelated_question_misses(make_cache, shared_data):
    cache = make_cache()
    groups = json.loads((shared_data / "semcache" / "paraphrase_cases.json").read_text())
    for g in groups:
        res = cache.insert(g["original_question"], f"answer to {g['original_question']}", "t1")
        assert res.stored, res
    hits = 0
    for g in groups:
        for para in g["similar_questions"]:
            res = cache.lookup(para, "t1")
            if res.hit:
                hits += 1
                assert res.answer == f"answer to {g['original_question']}"  # never another group's answer
    assert hits >= 8, f"only {hits}/15 paraphrases hit"
    for unrelated in ["How do I change a flat tyre on a bicycle?", "What is the capital of Australia?"]:
        res = cache.lookup(unrelated, "t1")
        assert not res.hit, res
    res = cache.lookup("Can you explain cognitive dissonance?", "t1")
    assert res.hit and res.cached_question == Q and res.similarity > 0.9
    assert res.category == "psychology" and res.category_source == "classifier"


def test_strict_category_refuses_what_a_loose_one_accepts(make_cache):
    cats = (
        Category("default"),
        Category("chat", threshold=0.90),
        Category("careful", threshold=0.95, strict=True),
    )
    cache = make_cache(categories=cats, verify=False)
    para = "Tell me about cognitive dissonance"
    for cat in ("chat", "careful"):
        cache.insert(Q, f"{cat} answer", "t", category=cat)
    loose, strict = cache.lookup(para, "t", category="chat"), cache.lookup(para, "t", category="careful")
    assert 0.90 <= loose.similarity < 0.95 and strict.similarity == pytest.approx(loose.similarity, abs=1e-5)
    assert loose.hit and loose.answer == "chat answer" and loose.threshold == 0.90
    assert not strict.hit and strict.threshold == 0.95
    cache.set_load("default", 1.0)  # under load the loose one relaxes, the strict one never does
    assert cache.lookup(para, "t", category="careful").threshold == 0.95
    assert cache.lookup(para, "t", category="chat").threshold == pytest.approx(0.87)


def test_load_policy_through_the_cache_with_hysteresis(make_cache):
    cache = make_cache(verify=False)
    cache.insert(Q, "A", "t", category="default")
    sim = cache.lookup("Tell me about cognitive dissonance", "t", category="default").similarity
    cache.update_category("default", threshold=min(sim + 0.01, 1.0))  # just out of reach
    signals = [(0.5, False), (0.85, True), (0.7, True), (0.55, False), (0.75, False)]
    for load, should_hit in signals:
        cache.set_load("default", load)
        res = cache.lookup("Tell me about cognitive dissonance", "t", category="default")
        assert res.hit is should_hit, (load, res)
    cache.set_load("default", 0.9)
    relaxed = cache.insert("How do I brew green tea?", "B", "t", category="default")
    cache.set_load("default", 0.1)
    normal = cache.insert("How do I brew black tea?", "C", "t", category="default")
    ttl = cache.categories.get("default").ttl_s
    assert relaxed.expires - time.time() == pytest.approx(2 * ttl, abs=60)
    assert normal.expires - time.time() == pytest.approx(ttl, abs=60)


def test_expired_entry_is_never_served_also_after_restart(make_cache, redis_url, redis_prefix):
    cache = make_cache()
    cache.insert(Q, "short-lived", "t", ttl_s=1.0)
    cache.insert("How do I bake sourdough bread?", "long-lived", "t")
    assert cache.lookup(Q, "t").hit
    cache.close()  # snapshot holds the short-lived entry
    time.sleep(1.2)
    res = cache.lookup(Q, "t")
    assert not res.hit and res.answer is None
    restarted = make_cache()
    assert restarted.start_report["snapshot"] == "loaded"
    assert restarted.start_report["dropped_not_in_store"] >= 0
    assert not restarted.lookup(Q, "t").hit
    assert restarted.lookup("How do I bake sourdough bread?", "t").answer == "long-lived"


def test_expiry_is_checked_by_the_cache_itself_on_a_local_store(embedder, tmp_path, shared_data):
    from semcache.cache import SemanticCache
    from semcache.config import SemcacheConfig

    cfg = SemcacheConfig(folder=str(tmp_path / "f"), classifier_examples=None)
    cache = SemanticCache(cfg, embedder=embedder)
    cache.insert(Q, "old", "t", ttl_s=0.5)
    cache.close()
    time.sleep(0.6)
    assert not cache.lookup(Q, "t").hit
    assert cache.stats()["entries"] == {}
    again = SemanticCache(cfg, embedder=embedder)  # documents and index come back from the folder
    assert not again.lookup(Q, "t").hit
    again.insert(Q, "new", "t")
    again.close()
    third = SemanticCache(cfg, embedder=embedder)
    assert third.lookup(Q, "t").answer == "new"


def test_tenants_never_see_each_other(make_cache):
    cache = make_cache()
    tenants = [f"tenant-{i}" for i in range(12)]
    question = "What is my current account balance?"
    cache.insert(question, "answer of tenant-0", "tenant-0")
    for t in tenants[1:]:
        res = cache.lookup(question, t)  # identical text, similarity 1.0 in another scope
        assert not res.hit and res.answer is None, (t, res)
    for t in tenants[1:]:
        cache.insert(question, f"answer of {t}", t)
    cache.insert(question, "other model answer", "tenant-0", model="other-llm")
    for t in tenants:
        for q in (question, "What's my account balance right now?"):
            res = cache.lookup(q, t)
            assert res.answer in (None, f"answer of {t}"), (t, q, res.answer)
        assert cache.lookup(question, t).answer == f"answer of {t}"
    assert cache.lookup(question, "tenant-0", model="other-llm").answer == "other model answer"
    assert cache.invalidate("tenant-1") == 1  # removes only tenant-1's entry
    assert cache.lookup(question, "tenant-2").answer == "answer of tenant-2"
    assert not cache.lookup(question, "tenant-1").hit


def test_quotas_hold_under_many_inserts(make_cache, redis_url, redis_prefix):
    cats = (
        Category("default"),
        Category("small", max_entries=5, max_bytes=10_000),
        Category("tight", max_bytes=600),
    )
    cache = make_cache(categories=cats, verify=False)
    questions = [f"What is the population of city number {i} in region {i % 7}?" for i in range(40)]
    results = []
    for start in range(0, 40, 4):
        chunk = questions[start : start + 4]
        results += cache.insert_many(chunk, [f"answer {start}"] * 4, "t", categories=["small"] * 4)
        assert cache.lookup(questions[0], "t", category="small").hit  # used often: LRU keeps it
    assert sum(r.evicted for r in results) == 35
    stats = cache.stats()
    assert stats["entries"]["small"]["entries"] == 5
    assert stats["metrics"]["small"]["evictions"] == 35
    assert cache.lookup(questions[0], "t", category="small").hit  # LRU kept the hot entry
    assert cache.lookup(questions[-1], "t", category="small").hit
    docs = list(redis.Redis.from_url(redis_url).scan_iter(match=f"{redis_prefix}e:*"))
    assert len(docs) == 5  # evicted documents are gone from Redis too
    for i in range(6):
        cache.insert(f"How many moons does planet {i} have?", "y" * 150, "t", category="tight")
    n, size = cache.ledger.usage(next(s for s in cache.ledger.scopes() if s.category == "tight"))
    assert size <= 600 and n == 3
    big = cache.insert("A huge answer?", "z" * 700, "t", category="tight")
    assert not big.stored and "quota" in big.reason
    cache.update_category("small", max_entries=2)
    assert cache.stats()["entries"]["small"]["entries"] == 2


def test_scope_count_is_bounded_and_small_scopes_cost_little(make_cache):
    cache = make_cache(verify=False, max_scopes=250)
    vec = cache.embedder.embed_one(Q)
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    for i in range(200):  # the reviewer's case: one insert each for tenants t0..t199
        assert cache.insert(Q, "A", f"t{i}", category="default", vector=vec).stored
    with open("/proc/self/status") as f:
        grown = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024 - before
    assert grown < 40, f"200 one-entry scopes grew RSS by {grown:.0f} MiB"  # was ~500 MiB
    assert cache.stats()["index"] == {
        "scopes": 200,
        "max_scopes": 250,
        "hnsw_scopes": 0,
        "bytes_estimated": 200 * 4 * 384 * 4,
    }
    for i in range(200, 250):
        assert cache.insert(Q, "A", f"t{i}", category="default", vector=vec).stored
    refused = cache.insert(Q, "A", "t250", category="default", vector=vec)
    assert not refused.stored and "max_scopes" in refused.reason and "250" in refused.reason
    assert cache.insert(Q, "B", "t7", category="default", vector=vec).stored  # an existing scope: fine
    miss = cache.lookup(Q, "t250", category="default", vector=vec)
    assert not miss.hit and miss.reason == "nothing cached in this scope"
    assert cache.stats()["metrics"]["default"]["scope_limit"] == 1
    assert cache.invalidate("t0") == 1  # its scope is dropped, which frees a place
    assert cache.insert(Q, "A", "t250", category="default", vector=vec).stored
    assert len(cache.indexes) == 250


def test_index_survives_restart_and_is_rebuilt_from_redis(make_cache, tmp_path):
    cache = make_cache()
    qs = [f"How do I grow {plant} on a balcony?" for plant in ("tomatoes", "basil", "chillies", "mint")]
    cache.insert_many(qs, [f"A{i}" for i in range(4)], "t")
    cache.update_category("law", threshold=0.97, ttl_s=60)
    cache.close()
    warm = make_cache()
    assert (warm.categories.get("law").threshold, warm.categories.get("law").ttl_s) == (0.97, 60)
    assert warm.start_report == {**warm.start_report, "snapshot": "loaded", "added_from_store": 0}
    assert [warm.lookup(q, "t").answer for q in qs] == ["A0", "A1", "A2", "A3"]
    warm.insert("How do I grow lettuce on a balcony?", "A4", "t")  # not in the snapshot
    shutil.rmtree(tmp_path / "semcache" / "index")
    cold = make_cache()
    assert cold.start_report["snapshot"] == "absent" and cold.start_report["added_from_store"] == 5
    assert cold.lookup("How do I grow lettuce on a balcony?", "t").answer == "A4"


def test_processes_on_one_redis_prefix_see_each_others_changes(make_cache, tmp_path):
    a = make_cache(sync_interval_s=0.0)
    b = make_cache(sync_interval_s=0.0, folder=str(tmp_path / "other"))  # a second server, say
    assert not b.lookup(Q, "t").hit
    a.insert(Q, "from a", "t")
    assert b.lookup("Can you explain cognitive dissonance?", "t").answer == "from a"
    b.insert("How do I bake sourdough bread?", "from b", "t")
    assert a.lookup("How do I bake sourdough bread?", "t").answer == "from b"
    assert a.invalidate("t", question=Q) == 1
    res = b.lookup(Q, "t")
    assert not res.hit and res.reason == "nothing cached in this scope", res
    assert b.stats()["entries"]["default"]["entries"] == 1


def test_redis_flush_is_detected(make_cache, redis_url, redis_prefix):
    cache = make_cache()
    cache.insert(Q, "A", "t")
    cache.close()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{redis_prefix}*"):  # what FLUSHALL does to this cache's keys
        client.delete(key)
    res = cache.lookup(Q, "t")
    assert not res.hit and "flushed" in res.reason
    assert cache.stats()["flushes_detected"] == 1
    assert cache.insert(Q, "B", "t").stored and cache.lookup(Q, "t").answer == "B"
    cache.close()
    for key in client.scan_iter(match=f"{redis_prefix}*"):
        client.delete(key)
    restarted = make_cache()
    assert restarted.start_report["snapshot"] == "stale"
    assert restarted.stats()["flushes_detected"] == 1 and not restarted.lookup(Q, "t").hit


def test_bad_inputs_get_clear_errors_and_change_nothing(make_cache):
    cache = make_cache()
    cache.insert(Q, "kept", "t")
    cases = [
        (ValueError, "empty", lambda: cache.lookup("", "t")),
        (ValueError, "empty", lambda: cache.lookup("   \n", "t")),
        (ValueError, "limit is 2048", lambda: cache.lookup("why " * 600, "t")),
        (TypeError, "int", lambda: cache.lookup(42, "t")),
        (TypeError, "bytes", lambda: cache.insert(b"raw bytes", "a", "t")),
        (TypeError, "NoneType", lambda: cache.insert(Q, None, "t")),
        (ValueError, "answer has", lambda: cache.insert(Q, "x" * 300_000, "t")),
        (ValueError, "tenant", lambda: cache.lookup(Q, "two words")),
        (ValueError, "tenant", lambda: cache.lookup(Q, "")),
        (ValueError, "unknown category 'nope'", lambda: cache.lookup(Q, "t", category="nope")),
        (TypeError, "metadata", lambda: cache.insert(Q, "a", "t", metadata={"x": object()})),
        (ValueError, "ttl_s", lambda: cache.insert(Q, "a", "t", ttl_s=-1)),
        (ValueError, "vector", lambda: cache.lookup(Q, "t", vector=[0.1, 0.2])),
        (ValueError, "differ in length", lambda: cache.insert_many([Q, Q], ["a"], "t")),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    assert cache.lookup(Q, "t").answer == "kept"
    assert cache.stats()["entries"]["psychology"]["entries"] == 1


def test_category_ttl_is_finite_and_capped_also_when_saved_or_relaxed(embedder, tmp_path):
    from semcache.cache import SemanticCache
    from semcache.config import SemcacheConfig
    from semcache.limits import Limits

    cfg = SemcacheConfig(folder=str(tmp_path / "f"), classifier_examples=None, verify=False)
    cache = SemanticCache(cfg, embedder=embedder)
    for value in (float("inf"), float("nan"), 91 * 86400.0):
        with pytest.raises(ValueError, match="ttl_s of 'zz'"):
            cache.update_category("zz", ttl_s=value)
    with pytest.raises(ValueError, match="threshold of 'zz'"):
        cache.update_category("zz", threshold=float("nan"))
    assert "zz" not in cache.categories
    cache.update_category("zz", ttl_s=3600)
    saved = tmp_path / "f" / "documents" / "categories.json"
    rows = json.loads(saved.read_text())
    # An older version saved `Infinity` (not JSON); such a row is skipped at start, the others are kept.
    rows.append({**rows[-1], "name": "bad", "ttl_s": float("inf")})
    saved.write_text(json.dumps(rows))
    cache.close()
    again = SemanticCache(cfg, embedder=embedder)
    assert again.categories.get("zz").ttl_s == 3600 and "bad" not in again.categories
    # The load policy doubles a category's TTL; the result stays within max_ttl_s.
    capped = SemanticCache(
        SemcacheConfig(
            folder=None,
            classifier_examples=None,
            verify=False,
            categories=(Category("default", ttl_s=4000),),
            limits=Limits(max_ttl_s=5000.0),
        ),
        embedder=embedder,
    )
    capped.set_load("default", 0.9)
    res = capped.insert(Q, "A", "t")
    assert res.stored and res.expires - time.time() == pytest.approx(5000, abs=60)
    again.close()
    capped.close()


def test_private_category_is_never_cached_and_duplicates_replace(make_cache):
    cache = make_cache()
    res = cache.insert("My password is hunter2, what should I do?", "x", "t", category="private")
    assert not res.stored and "not cacheable" in res.reason
    assert not cache.lookup("My password is hunter2, what should I do?", "t", category="private").hit
    first = cache.insert(Q, "v1", "t")
    second = cache.insert(Q, "v2", "t")
    assert second.replaced and cache.lookup(Q, "t").answer == "v2"
    assert cache.stats()["entries"][first.category]["entries"] == 1


def test_verifier_stage_refuses_near_duplicates_a_threshold_accepts(make_cache, redis_prefix):
    cats = (Category("default", threshold=0.75),)
    near = [
        (
            "How do I sort a list in ascending order in Python?",
            "How do I sort a list in descending order in Python?",
        ),
        ("What is 15 percent of 80?", "What is 25 percent of 80?"),
    ]
    plain = make_cache(categories=cats, verify=False)
    verified = make_cache(categories=cats, verify=True, redis_prefix=redis_prefix + "verified:")
    for cache in (plain, verified):
        for cached, _ in near:
            cache.insert(cached, f"answer: {cached}", "t", category="default")
    for _, query in near:
        assert plain.lookup(query, "t").hit  # cosine alone serves the wrong answer
        res = verified.lookup(query, "t")
        assert not res.hit and res.reason == "refused by the verifier", res
    ok = verified.lookup("In Python, how can I sort a list in ascending order?", "t")
    assert ok.hit and ok.p_same > verified.verifier.cut
    assert ok.timings_ms["verify"] > 0.0  # the stage's cost is reported apart from search + fetch
    assert (
        plain.lookup("In Python, how can I sort a list in ascending order?", "t").timings_ms["verify"] == 0.0
    )
    assert plain.verifier is None  # switched off: the cross-encoder is not even loaded
    assert verified.stats()["metrics"]["default"]["rejected_by_verifier"] >= 2


def test_dead_redis_degrades_to_misses(embedder, tmp_path, shared_data):
    from semcache.cache import SemanticCache
    from semcache.config import SemcacheConfig

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary needed to start and kill a private Redis")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(50):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        cache = SemanticCache(
            SemcacheConfig(redis_url=url, folder=str(tmp_path), classifier_examples=None), embedder=embedder
        )
        cache.insert(Q, "A", "t")
        assert cache.lookup(Q, "t").hit
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    res = cache.lookup(Q, "t")
    assert not res.hit and "unavailable" in res.reason
    ins = cache.insert("Another question?", "B", "t")
    assert not ins.stored and "unavailable" in ins.reason
    assert cache.stats()["store"]["reachable"] is False
    with pytest.raises(StoreUnavailable, match="unreachable"):
        SemanticCache(
            SemcacheConfig(redis_url=url, folder=str(tmp_path), classifier_examples=None), embedder=embedder
        )
