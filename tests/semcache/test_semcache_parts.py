"""The parts on their own: embedder, index, documents, categories, classifier, load policy, verifier."""

from __future__ import annotations

import time

import numpy as np
import pytest

from semcache.categories import Category, CategorySet
from semcache.classify import CentroidClassifier, cross_validate, load_examples
from semcache.index import IndexParams, VectorIndex
from semcache.load_policy import LoadPolicy, LoadPolicyConfig
from semcache.local_store import LocalStore
from semcache.pair_features import FEATURES, IdfTable, pair_features
from semcache.redis_store import RedisStore
from semcache.scope import Scope
from semcache.store import Entry
from semcache.verify import Verifier

SORTS = ["How do I sort a list ascending in Python?", "How do I sort a list descending in Python?"]


def test_embeddings_match_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    texts = SORTS + ["What is cognitive dissonance?", "Can you explain cognitive dissonance?", "ok"]
    ours = embedder.embed(texts)
    ref = SentenceTransformer(str(embedder.folder), device="cpu").encode(texts, normalize_embeddings=True)
    assert ours.shape == (5, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.abs(ours - ref).max() < 1e-4
    # Batched (padded) and one-by-one give the same vectors, and a repeat comes from the LRU.
    single = np.stack([embedder.embed([t])[0] for t in reversed(texts)])[::-1]
    assert np.abs(single - ours).max() < 1e-5


def test_embedder_rejects_non_text(embedder):
    with pytest.raises(TypeError, match="list of str"):
        embedder.embed("not a list")
    with pytest.raises(TypeError, match="int"):
        embedder.embed(["fine", 3])


def _unit(rng, n, dim=16):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_index_grows_deletes_rebuilds_and_persists(tmp_path):
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 300)
    params = IndexParams(initial_capacity=8, hnsw_min_entries=64, rebuild_deleted_fraction=0.25)
    index = VectorIndex(16, params)
    for i, v in enumerate(vecs):
        index.add(f"e{i}", v)  # a matrix up to 64 entries, then a graph of 128 -> 512 by doubling
    assert len(index) == 300 and index.kind == "hnsw"
    assert index.search(vecs[123], 1)[0][0] == "e123"
    for i in range(0, 200):
        assert index.remove(f"e{i}")
    assert not index.remove("e0")
    assert len(index) == 100 and index._deleted < 0.25 * index._next  # rebuilt, tombstones gone
    assert index.kind == "hnsw"
    hits = index.search(vecs[5], 5)
    assert all(int(h[0][1:]) >= 200 for h in hits)  # a deleted entry is never returned
    assert index.search(vecs[250], 1)[0] == ("e250", pytest.approx(1.0, abs=1e-5))
    index.save(tmp_path / "ix")
    again = VectorIndex.load(tmp_path / "ix")
    assert sorted(again.ids()) == sorted(index.ids())
    assert again.search(vecs[299], 1)[0][0] == "e299"
    with pytest.raises(ValueError, match="shape"):
        index.search(np.zeros(8, np.float32), 1)
    with pytest.raises(ValueError, match="already indexed"):
        index.add("e250", vecs[0])
    assert again.kind == "hnsw"
    (tmp_path / "ix" / "meta.json").write_text("{broken")
    with pytest.raises(ValueError, match="unreadable"):
        VectorIndex.load(tmp_path / "ix")


def test_small_index_is_an_exact_matrix_grown_by_doubling(tmp_path):
    rng = np.random.default_rng(1)
    vecs = _unit(rng, 100)
    params = IndexParams(initial_capacity=4, hnsw_min_entries=64)
    index = VectorIndex(16, params)
    assert index.kind == "flat" and index.nbytes() == 4 * 16 * 4  # 4 rows, not 1,024
    for i, v in enumerate(vecs[:40]):
        index.add(f"e{i}", v)
    assert index.kind == "flat" and index.nbytes() == 64 * 16 * 4  # 4 -> 64 rows by doubling
    exact = np.argsort(-(vecs[:40] @ vecs[7]))[:5]
    assert [i for i, _ in index.search(vecs[7], 5)] == [f"e{j}" for j in exact]
    assert index.search(vecs[7], 1)[0][1] == pytest.approx(1.0, abs=1e-5)
    for i in range(0, 40, 2):
        assert index.remove(f"e{i}")
    assert not index.remove("e0") and len(index) == 20 and "e0" not in index
    assert all(int(i[1:]) % 2 for i, _ in index.search(vecs[0], 20))  # removed entries never return
    index.save(tmp_path / "flat")
    again = VectorIndex.load(tmp_path / "flat")
    assert again.kind == "flat" and sorted(again.ids()) == sorted(index.ids())
    assert again.search(vecs[9], 1)[0][0] == "e9"
    for i, v in enumerate(vecs[40:], start=40):
        again.add(f"e{i}", v)
    assert again.kind == "hnsw" and len(again) == 80  # promoted past 64 entries
    for i in range(40, 100):
        again.remove(f"e{i}")
    assert again.kind == "flat" and len(again) == 20  # a rebuild below 32 entries goes back
    assert again.search(vecs[11], 1)[0][0] == "e11"


def test_snapshot_of_a_small_graph_loads_as_a_matrix(tmp_path):
    """Snapshots saved before small scopes stayed exact hold 1,024-element graphs: loaded as matrices."""
    rng = np.random.default_rng(2)
    vecs = _unit(rng, 10)
    index = VectorIndex(16, IndexParams(hnsw_min_entries=2))
    for i, v in enumerate(vecs):
        index.add(f"e{i}", v)
    assert index.kind == "hnsw"
    index.save(tmp_path / "ix")
    again = VectorIndex.load(tmp_path / "ix", IndexParams())
    assert again.kind == "flat" and again.search(vecs[3], 1)[0][0] == "e3"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_many_small_indexes_cost_little_memory():
    """200 one-entry indexes of 384 dimensions: each hnswlib graph held ~2.5 MiB (500 MiB in all)."""
    rng = np.random.default_rng(3)
    vecs = _unit(rng, 200, dim=384)
    before = _rss_mib()
    kept = []
    for i, v in enumerate(vecs):
        index = VectorIndex(384)
        index.add(f"e{i}", v)
        kept.append(index)
    grown = _rss_mib() - before
    assert grown < 20, f"200 small indexes grew RSS by {grown:.0f} MiB"
    assert sum(i.nbytes() for i in kept) == 200 * 4 * 384 * 4


def _entry(i: int, tenant: str = "t", expires: float | None = None) -> Entry:
    vec = np.full(4, 0.5, np.float32)
    return Entry(
        f"id{i}",
        Scope(tenant, "m", "default"),
        f"q{i}",
        f"a{i}",
        vec,
        {"n": i},
        expires=expires if expires is not None else time.time() + 60,
    )


def test_entry_codec_and_corruption():
    e = _entry(1)
    back = Entry.decode(e.encode())
    assert (back.id, back.scope, back.question, back.answer, back.metadata) == (
        e.id,
        e.scope,
        "q1",
        "a1",
        {"n": 1},
    )
    np.testing.assert_array_equal(back.vector, e.vector)
    with pytest.raises(ValueError, match="corrupt"):
        Entry.decode(e.encode()[:-7])
    with pytest.raises(ValueError, match="corrupt"):
        Entry.decode(b"\x93\x01\x02")


def test_redis_store_ttl_epoch_and_corrupt_documents(redis_url, redis_prefix):
    import redis

    store = RedisStore(redis_url, redis_prefix)
    epoch = store.ensure_epoch()
    assert store.ensure_epoch() == epoch  # set once, never replaced while present
    store.put(_entry(1))
    store.put(_entry(2, expires=time.time() + 0.3))
    client = redis.Redis.from_url(redis_url)
    assert 0 < client.pttl(f"{redis_prefix}e:id2") <= 300  # Redis itself expires it
    client.set(f"{redis_prefix}e:id3", b"\x00garbage")
    docs, seen_epoch = store.get_many(["id1", "id2", "id3", "nope"])
    assert set(docs) == {"id1", "id2"} and seen_epoch == epoch
    time.sleep(0.4)
    assert set(store.get_many(["id1", "id2"])[0]) == {"id1"}
    assert [e.id for e in store.scan()] == ["id1"]
    store.clear()
    assert store.epoch() is None and store.get_many(["id1"])[0] == {}


def test_redis_store_wake_pings_without_waiting_and_never_mixes_replies(redis_url, redis_prefix):
    import redis

    from semcache.redis_store import WAKE_RETRY_S

    store = RedisStore(redis_url, redis_prefix, wake=True)
    store.ensure_epoch()
    store.put(_entry(1))
    store.put(_entry(2))
    client = redis.Redis.from_url(redis_url)

    def wake_clients():
        return [c for c in client.client_list() if c["name"] == f"{redis_prefix}wake"]

    assert wake_clients() == []  # connected on the first wake only
    for n in range(30):  # wakes interleaved with fetches: every fetch gets its own reply
        store.wake()
        if n % 3 == 0:
            store.wake()  # the PING's reply may still be unread: no second PING is stacked
        docs, _ = store.get_many(["id1", "id2"] if n % 2 else ["id2"])
        assert set(docs) == ({"id1", "id2"} if n % 2 else {"id2"})
    (conn,) = wake_clients()  # one connection, named after the prefix, last command a PING
    assert conn["cmd"] == "ping"
    store.clear()

    off = RedisStore(redis_url, redis_prefix + "off:")
    off.wake()  # off by default: sends nothing
    assert [c for c in client.client_list() if c["name"] == f"{redis_prefix}off:wake"] == []

    dead = RedisStore("redis://127.0.0.1:1/0", "x:", timeout_s=0.5, wake=True)
    t0 = time.perf_counter()
    dead.wake()  # refused: no exception, and no retry within WAKE_RETRY_S
    dead.wake()
    assert time.perf_counter() - t0 < min(0.5, WAKE_RETRY_S)


def test_redis_store_names_a_dead_server():
    from semcache.store import StoreUnavailable

    store = RedisStore("redis://user:hunter2@127.0.0.1:1/0", "x:", timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="unreachable") as err:
        store.get_many(["a"])
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError, match="redis url"):
        RedisStore("localhost:6379")


def test_local_store_persists_and_skips_corrupt_and_expired(tmp_path):
    store = LocalStore(tmp_path)
    epoch = store.ensure_epoch()
    store.put(_entry(1))
    store.put(_entry(2, expires=time.time() + 0.2))
    store.put(_entry(3))
    store._path("id3").write_bytes(b"torn")
    time.sleep(0.3)
    again = LocalStore(tmp_path)
    assert again.epoch() == epoch
    assert [e.id for e in again.scan()] == ["id1"]
    assert not again._path("id2").exists()  # the expired file is removed at load


def test_categories_validate_and_update():
    cats = CategorySet()
    assert cats.get("health").strict and not cats.get("private").cacheable
    with pytest.raises(ValueError, match="unknown category 'nope'"):
        cats.get("nope")
    with pytest.raises(ValueError, match="threshold"):
        Category("x", threshold=1.5)
    with pytest.raises(ValueError, match="ttl_s"):
        Category("x", ttl_s=0)
    with pytest.raises(ValueError, match="name"):
        Category("Bad Name!")
    with pytest.raises(ValueError, match="unknown category fields"):
        cats.update("health", colour="red")
    assert cats.update("health", threshold=0.97).threshold == 0.97
    assert cats.update("fresh", threshold=0.8).name in cats.names()
    with pytest.raises(ValueError, match="default category"):
        CategorySet([Category("a")], default="b")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ttl_s", float("inf")),
        ("ttl_s", float("nan")),
        ("threshold", float("nan")),
        ("threshold", float("inf")),
    ],
)
def test_category_numbers_must_be_finite(field, value):
    with pytest.raises(ValueError, match=f"{field} of 'zz' must be a finite number"):
        Category("zz", **{field: value})
    cats = CategorySet(max_ttl_s=90 * 86400.0)
    with pytest.raises(ValueError, match=field):
        cats.update("zz", **{field: value})
    with pytest.raises(ValueError, match=field):
        cats.update("health", **{field: value})
    assert "zz" not in cats and cats.get("health").ttl_s == 6 * 3600.0  # nothing changed


def test_category_ttl_capped_like_an_inserts():
    cats = CategorySet(max_ttl_s=90 * 86400.0)
    assert cats.update("zz", ttl_s=90 * 86400.0).ttl_s == 90 * 86400.0
    with pytest.raises(ValueError, match="ttl_s of 'zz' must be <= max_ttl_s"):
        cats.update("zz", ttl_s=91 * 86400.0)
    with pytest.raises(ValueError, match="ttl_s of 'long' must be <= max_ttl_s"):
        CategorySet([Category("default"), Category("long", ttl_s=1e9)], max_ttl_s=86400.0)


def test_classifier_cross_validated_accuracy(embedder, shared_data):
    questions, labels = load_examples(shared_data / "semcache" / "domain_questions_dev.json")
    vecs = embedder.embed(questions)
    acc = cross_validate(vecs, labels, folds=5)
    # 14 domains, chance is ~0.08; nearest centroid on MiniLM embeddings reaches well above it.
    assert acc >= 0.55, acc
    clf = CentroidClassifier.fit(vecs, labels)
    pred = clf.predict(embedder.embed(["What are the symptoms of type 2 diabetes and how is it treated?"]))[0]
    assert pred.category == "health"


def test_load_policy_relaxes_and_restores_with_hysteresis():
    policy = LoadPolicy(
        LoadPolicyConfig(high=0.8, low=0.6, threshold_step=0.03, threshold_floor=0.85, ttl_factor=2.0)
    )
    loose, strict, low = (
        Category("a", threshold=0.90),
        Category("b", threshold=0.95, strict=True),
        Category("c", threshold=0.86),
    )
    assert policy.threshold(loose, "m") == 0.90
    assert policy.set_load("m", 0.85) is True
    assert policy.threshold(loose, "m") == pytest.approx(0.87)
    assert policy.threshold(low, "m") == 0.85  # the floor caps the relaxation
    assert policy.threshold(strict, "m") == 0.95 and policy.ttl(strict, "m") == strict.ttl_s
    assert policy.ttl(loose, "m") == 2 * loose.ttl_s
    assert policy.set_load("m", 0.7) is True  # between low and high: stays relaxed (hysteresis)
    assert policy.set_load("m", 0.6) is False
    assert policy.threshold(loose, "m") == 0.90
    assert policy.set_load("m", 0.79) is False  # below high: stays normal
    assert policy.threshold(loose, "other-model") == 0.90
    with pytest.raises(ValueError, match="load"):
        policy.set_load("m", 1.5)
    with pytest.raises(ValueError, match="hysteresis"):
        LoadPolicyConfig(high=0.5, low=0.6)


def test_verifier_weights_load_and_refuse_number_and_negation_changes(embedder):
    verifier = Verifier.load()
    pairs = [
        ("How do I learn Python quickly?", "What is the fastest way to learn Python?"),
        ("What is 15 percent of 80?", "What is 25 percent of 80?"),
        ("Why can't I sleep at night?", "Why can I sleep at night?"),
    ]
    p = []
    for a, b in pairs:
        u, v = embedder.embed([a, b])
        p.append(verifier.p_same(a, b, u, v))
    assert p[0] > p[1] and p[0] > p[2]
    idf = verifier.idf
    assert pair_features(*pairs[1], 0.9, idf)[FEATURES.index("number_mismatch")] == 1.0
    assert pair_features(*pairs[2], 0.9, idf)[FEATURES.index("negation_mismatch")] == 1.0


def test_pair_features_weigh_rare_words_and_word_order():
    texts = ["what is the best car?"] * 5 + ["what is the best towing service?", "is it efficient?"]
    idf = IdfTable.from_texts(texts + ["how do i learn the piano?", "what is an affordable car?"], min_df=1)
    assert idf("the") < idf("car") < idf("towing") == idf("zyzzyva") == idf.unseen  # unseen: as rare as once

    def named(a: str, b: str, cos: float) -> dict[str, float]:
        return dict(zip(FEATURES, pair_features(a, b, cos, idf), strict=True))

    f = named("best towing service?", "efficient towing service?", 0.9)
    g = named("what is the best car?", "what is the car?", 0.9)
    assert f["idf_unshared_max"] > g["idf_unshared_max"]  # "efficient" is rarer than "best"
    swap = named("convert dollars to rupees", "convert rupees to dollars", 0.95)
    assert swap["jaccard"] == 1.0 and swap["bigram_jaccard"] < 0.5 and swap["sequence_ratio"] < 1.0
    assert len(pair_features("a?", "b?", 0.5, idf)) == len(FEATURES)
    with pytest.raises(ValueError, match="at least one text"):
        IdfTable.from_texts([])


def test_mlp_learns_and_verifier_weights_round_trip(tmp_path):
    from semcache.mlp import Mlp, MlpParams, fit_mlp

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, len(FEATURES))).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 3] > 0).astype(np.float32)
    net = fit_mlp(X, y, MlpParams(hidden=8, epochs=200), seed=0)
    assert ((net.logits(X) > 0) == (y > 0.5)).mean() > 0.9  # a separable toy problem is learned
    idf = IdfTable({"towing": 5.0}, 7.0)
    verifier = Verifier([net, fit_mlp(X, y, MlpParams(hidden=8, epochs=5), seed=1)], idf, cut=0.6)
    verifier.save(tmp_path / "v.safetensors", {"validation": "{}"})
    back = Verifier.load(tmp_path / "v.safetensors")
    assert back.cut == 0.6 and back.idf == idf and back.metadata["validation"] == "{}"
    np.testing.assert_allclose(back.probability(X), verifier.probability(X), rtol=1e-6)
    with pytest.raises(ValueError, match="features"):
        Verifier([Mlp(*[np.zeros(s, np.float32) for s in ((3,), (3,), (3, 2), (2,), (2,))], 0.0)], idf)
    with pytest.raises(ValueError, match="shapes"):
        Mlp(np.zeros(3), np.ones(3), np.zeros((4, 2)), np.zeros(2), np.zeros(2), 0.0)
    with pytest.raises(ValueError, match="cut"):
        Verifier([net], idf, cut=1.5)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable"):
        Verifier.load(tmp_path / "bad.safetensors")


def test_split_keeps_every_question_on_one_side(shared_data):
    from semcache.fit import component_keys, load_pairs, split_pairs, split_train

    chain = [
        {"text_a": "q1", "text_b": "q2", "label": 1},
        {"text_a": "q3", "text_b": "q2", "label": 0},  # joins q1's component through q2
        {"text_a": "q4", "text_b": "q5", "label": 1},
    ]
    assert component_keys(chain) == ["q1", "q1", "q4"]
    pairs = load_pairs(shared_data / "semcache" / "qqp_pairs_dev.json")
    train, held = split_pairs(pairs)
    fit_side, calib = split_train(train)

    def texts(side):
        return {t for p in side for t in (p["text_a"], p["text_b"])}

    assert len(train) + len(held) == len(pairs) and 0.4 < len(held) / len(pairs) < 0.6
    assert not texts(train) & texts(held)  # QQP questions repeat across pairs: none crosses the split
    assert not texts(fit_side) & texts(calib)


# Taken from the held-out side of the split (asserted below): the shipped weights never saw them.
HELD_OUT_SAME = (
    "Which are the best countries for studying abroad?",
    "What are the best countries to study abroad?",
)
HELD_OUT_DIFFERENT = (
    "What are the pros and cons of marrying a girl who is 5 years younger?",
    "What are the pros and cons of marrying a girl who is 9 years younger?",
)


def test_shipped_verifier_separates_held_out_pairs(embedder, shared_data):
    from semcache.fit import load_pairs, split_pairs

    held = split_pairs(load_pairs(shared_data / "semcache" / "qqp_pairs_dev.json"))[1]
    labels = {(p["text_a"], p["text_b"]): p["label"] for p in held}
    assert labels[HELD_OUT_SAME] == 1 and labels[HELD_OUT_DIFFERENT] == 0
    verifier = Verifier.load()
    p, cos = [], []
    for cached, query in (HELD_OUT_SAME, HELD_OUT_DIFFERENT):
        v, u = embedder.embed([cached, query])
        cos.append(float(u @ v))
        p.append(verifier.p_same(query, cached, u, v))
    assert min(cos) >= 0.85  # both pass the default category's cosine threshold (0.85)
    assert p[0] >= verifier.cut > p[1], p


def test_precision_at_recall_and_operating_cut_count_every_positive():
    from semcache.fit import cut_for_recall, precision_at_recall

    # 4 positives in the whole set, but one lies below the cosine floor and never gets a P(same):
    # recall must count it, as on the held-out side.
    prob = np.array([0.9, 0.8, 0.8, 0.6, 0.4, 0.2])
    y = np.array([1, 1, 0, 1, 0, 0])
    best = precision_at_recall(prob, y, positives=4, min_recall=0.5)
    # cut 0.8 takes the 0.8 tie whole (2 of 3 right, recall 0.5); 0.6 gives 3/4 at recall 0.75
    assert best == {"precision": 0.75, "recall": 0.75, "cut": 0.6}
    assert precision_at_recall(prob, y, positives=4, min_recall=0.8) is None
    assert cut_for_recall(prob, y, positives=4, recall_target=0.5) == 0.8
    assert cut_for_recall(prob, y, positives=4, recall_target=0.25) == 0.9
    with pytest.raises(ValueError, match="no cut"):
        cut_for_recall(prob, y, positives=4, recall_target=0.9)


def test_verifier_never_refuses_the_identical_question(embedder):
    from semcache.verify import same_words

    # QQP has no identical pairs, so the cross-encoder's logit for one is arbitrary (it was -1.0 for
    # this question with the epoch-1 weights): the identity rule must decide before the networks.
    verifier = Verifier.load()
    q = "What is my current account balance?"
    u = embedder.embed([q])[0]
    assert verifier.p_same(q, "what is my current  account balance ?", u, u) == 1.0
    assert verifier.p_same_many([q], [q], u[None], u[None])[0] == 1.0
    assert not same_words("What does ~ mean in C++?", "What does % mean in C++?")  # symbols count
    assert not same_words("What does 无语 mean?", "What does 装逼 mean?")  # and any script's words
