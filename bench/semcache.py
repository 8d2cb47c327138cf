"""Benchmark of the semantic cache: precision/recall on QQP, lookup latency at 10k/100k entries, embedding.

    .venv/bin/python bench/semcache.py --quick    # 4,000 pairs; latency at 2k and 10k entries
    .venv/bin/python bench/semcache.py            # all 40,427 pairs; latency at 10k and 100k entries

Quality, on the held-out half of qqp_pairs_dev.json (semcache/fit.py: pairs grouped into connected
components of shared question texts, a component goes whole to one side, so no held-out question was
seen in fitting the shipped verifier on the other half): for each pair, text_a is cached and text_b is asked;
label 1 should hit, label 0 should not (precision = share of hits with label 1, recall = share of
label-1 pairs that hit). Three deciders on the same embeddings: one global cosine threshold; per-
category thresholds (query and entry classified by the nearest-centroid classifier; a pair whose two
questions land in different categories is a miss, as in the cache, whose scopes are per category;
each category's threshold is tuned on the training half for a target precision); and the verifier
stage (cosine >= a floor, then P(same) >= cut, run on every pair above the floor, batched; its time
per pair is reported), at the cut chosen on validation with a 95% interval from resampling whole
components. Plus the cache's default configuration as one point.

Latency: a real SemanticCache on the local Redis (verifier on), N entries in one scope (the worst case
for one search), queries are held-out QQP questions. Columns, each p50/p99 in ms: search + fetch
(embedding excluded: the query's vector is passed in; verification excluded), the verification stage
alone (only lookups with a candidate above the threshold run it), search + fetch + verification, and
on fresh questions (no LRU hit) embedding + search + fetch and the whole lookup (embedding + search +
fetch + verification). The timed lookups run in blocks of 50 in turn,
over the same queries: as configured ("wake_off"), with the store's wake-up PING (RedisStore.wake,
"wake_on") and without the verifier ("no_verifier"); each with the store's round trip alone and the
lookups whose span held a garbage collection. The top-level numbers are the default's. And a
2-document fetch is timed after pauses of 0-20 ms (idle or busy), which is what makes the fetch slow. Entries are real QQP embeddings; past the ~73k unique
QQP questions, the rest are synthetic (a normalized mix of two real embeddings plus noise), said in
the output. Prints one JSON line; writes bench/out/semcache.json and bench/out/semcache.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from semcache.cache import SemanticCache  # noqa: E402
from semcache.categories import CategorySet  # noqa: E402
from semcache.classify import CentroidClassifier, load_examples  # noqa: E402
from semcache.config import SemcacheConfig, default_examples  # noqa: E402
from semcache.embed import Embedder  # noqa: E402
from semcache.fit import (  # noqa: E402
    columns,
    component_keys,
    cosines,
    embed_cached,
    load_pairs,
    split_pairs,
)
from semcache.verify import DEFAULT_WEIGHTS, Verifier, weights_metadata  # noqa: E402

OUT = REPO / "bench" / "out"
TARGETS = np.round(np.arange(0.70, 0.97, 0.01), 2)
VERIFIER_FLOOR = 0.80


def pr(hit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    n = int(hit.sum())
    return (float(y[hit].mean()) if n else 1.0), float((hit & (y == 1)).sum() / max(int(y.sum()), 1))


def categories_of(
    pairs: list[dict], vec_of: dict, clf: CentroidClassifier, cats: CategorySet, min_score: float
):
    def cat(texts):
        preds = clf.predict(np.stack([vec_of[t] for t in texts]))
        return np.array(
            [p.category if p.score >= min_score and p.category in cats else cats.default for p in preds]
        )

    return cat([p["text_a"] for p in pairs]), cat([p["text_b"] for p in pairs])


def tune_thresholds(cos, y, ca, cb, target: float, min_pairs: int = 50) -> dict[str, float]:
    """Per category, the lowest threshold reaching `target` precision on the training half."""
    out = {"*": _lowest(cos, y, target)}
    for c in np.unique(ca):
        m = (ca == c) & (cb == c)
        out[c] = _lowest(cos[m], y[m], target) if m.sum() >= min_pairs else out["*"]
    return out


def _lowest(cos, y, target) -> float:
    order = np.argsort(-cos)
    prec = np.cumsum(y[order]) / np.arange(1, len(y) + 1)
    ok = np.nonzero(prec >= target)[0]
    return float(cos[order][ok.max()]) if ok.size else 1.01


def quality(
    train: list[dict], test: list[dict], vec_of: dict, embedder: Embedder, verifier_path: Path | None = None
) -> dict:
    cats = CategorySet()
    questions, labels = load_examples(default_examples())
    clf = CentroidClassifier.fit(embedder.embed(questions), labels)
    min_score = SemcacheConfig().min_category_score
    ytr, yte = columns(train, vec_of)[-1], columns(test, vec_of)[-1]
    cos_tr, cos_te = cosines(train, vec_of), cosines(test, vec_of)
    ca_tr, cb_tr = categories_of(train, vec_of, clf, cats, min_score)
    ca_te, cb_te = categories_of(test, vec_of, clf, cats, min_score)
    same_te = ca_te == cb_te
    weights = verifier_path or DEFAULT_WEIGHTS
    verifier = Verifier.load(weights)
    above = np.nonzero(cos_te >= VERIFIER_FLOOR)[0]
    q, c, U, V, _ = columns([test[i] for i in above], vec_of)
    t0 = time.perf_counter()
    p_te = np.zeros(len(test))
    p_te[above] = verifier.p_same_many(q, c, U, V)
    verify_ms_per_pair = (time.perf_counter() - t0) * 1e3 / max(len(above), 1)
    curves = {"global_threshold": [], "per_category_thresholds": [], "verifier": []}
    for t in np.round(np.arange(0.70, 1.0, 0.01), 2):
        curves["global_threshold"].append((float(t), *pr(cos_te >= t, yte)))
    for target in TARGETS:
        th = tune_thresholds(cos_tr, ytr, ca_tr, cb_tr, float(target))
        per = np.array([th.get(c, th["*"]) for c in ca_te])
        curves["per_category_thresholds"].append((float(target), *pr(same_te & (cos_te >= per), yte)))
    for cut in np.round(np.arange(0.05, 1.0, 0.05), 2):
        curves["verifier"].append((float(cut), *pr((cos_te >= VERIFIER_FLOOR) & (p_te >= cut), yte)))
    # The curves' best point picks its cut on the held-out pairs themselves; the operating cut was
    # chosen on the training side's validation part (semcache/fit.py) and is the honest number.
    validation = json.loads(weights_metadata(weights).get("validation", "null") or "null")
    operating = None
    if validation and "operating_cut" in validation:
        cut = float(validation["operating_cut"])
        served = (cos_te >= VERIFIER_FLOOR) & (p_te >= cut)
        p, r = pr(served, yte)
        operating = {
            "cut": cut,
            "precision": p,
            "recall": r,
            "bootstrap_95": component_bootstrap(test, served, yte),
            "validation": validation,
        }
    default_th = np.array([cats.get(c).threshold for c in ca_te])
    cacheable = np.array([cats.get(c).cacheable for c in ca_te])
    # the cache's thresholds are all >= the floor, so every pair they pass has a P(same)
    default_hit = same_te & cacheable & (cos_te >= default_th) & (p_te >= verifier.cut)
    default_no_verify = same_te & cacheable & (cos_te >= default_th)
    return {
        "train_pairs": len(train),
        "held_out_pairs": len(test),
        "held_out_positive": int(yte.sum()),
        "same_category_share": float(same_te.mean()),
        "curves": curves,
        "best_precision_at_recall_0.40": {k: _best(v, 0.40) for k, v in curves.items()},
        "verifier_at_validation_cut": operating,
        "cache_default": dict(zip(("precision", "recall"), pr(default_hit, yte), strict=True)),
        "cache_default_without_verifier": dict(
            zip(("precision", "recall"), pr(default_no_verify, yte), strict=True)
        ),
        "verifier_floor": VERIFIER_FLOOR,
        "verifier_cut": verifier.cut,
        "verified_pairs": len(above),
        "verify_ms_per_pair_batched": verify_ms_per_pair,
    }


def component_bootstrap(pairs: list[dict], served: np.ndarray, y: np.ndarray, reps: int = 2000) -> dict:
    """95% intervals of precision and recall, resampling whole components of shared questions (pairs
    that share a question are not independent samples)."""
    keys = component_keys(pairs)
    index = {k: i for i, k in enumerate(sorted(set(keys)))}
    comp = np.array([index[k] for k in keys])
    n = len(index)
    hits = np.bincount(comp, served.astype(float), n)
    tp = np.bincount(comp, (served & (y == 1)).astype(float), n)
    pos = np.bincount(comp, (y == 1).astype(float), n)
    w = np.random.default_rng(0).multinomial(n, np.full(n, 1.0 / n), size=reps).astype(float)
    precision, recall = (w @ tp) / np.maximum(w @ hits, 1.0), (w @ tp) / np.maximum(w @ pos, 1.0)
    return {
        "components": n,
        "precision": [float(x) for x in np.percentile(precision, [2.5, 97.5])],
        "recall": [float(x) for x in np.percentile(recall, [2.5, 97.5])],
    }


def _best(curve: list, min_recall: float) -> dict | None:
    ok = [(p, r, k) for k, p, r in curve if r >= min_recall]
    if not ok:
        return None
    p, r, k = max(ok)
    return {"precision": p, "recall": r, "setting": k}


def synthetic(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Realistic extra vectors: a normalized mix of two real question embeddings plus a little noise."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(real), n), rng.integers(0, len(real), n)
    w = rng.uniform(0.6, 0.9, (n, 1)).astype(np.float32)
    v = w * real[i] + (1 - w) * real[j] + rng.normal(0, 0.02, real[i].shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def latency(
    size: int,
    entries: list[str],
    vec_of: dict,
    queries: list[str],
    embedder: Embedder,
    redis_url: str,
    n_queries: int,
    n_e2e: int,
    verifier_path: Path | None = None,
) -> dict:
    load_before = os.getloadavg()  # the shared machine: every latency is read with its load
    real = np.stack([vec_of[t] for t in entries[:size]])
    vecs = real if len(real) >= size else np.concatenate([real, synthetic(real, size - len(real))])
    texts = entries[:size] + [f"synthetic question {i}?" for i in range(size - len(real))]
    answer = "A cached answer of about half a kilobyte. " * 12
    prefix = f"kvfuse-bench:semcache:{os.getpid()}:{size}:"
    cfg = SemcacheConfig(
        redis_url=redis_url,
        redis_prefix=prefix,
        folder=None,
        classifier_examples=None,
        verifier_path=str(verifier_path) if verifier_path else None,
    )
    cache = SemanticCache(cfg, embedder=embedder)
    try:
        t0 = time.perf_counter()
        for s in range(0, size, 2000):
            cache.insert_many(
                texts[s : s + 2000],
                [answer] * len(texts[s : s + 2000]),
                "bench",
                categories=["default"] * len(texts[s : s + 2000]),
                vectors=vecs[s : s + 2000],
            )
        insert_s = time.perf_counter() - t0
        qv = embedder.embed(queries[:n_queries])
        warm = [
            cache.lookup(q, "bench", category="default", vector=v)
            for q, v in zip(queries[:50], qv[:50], strict=True)
        ]
        assert all(not w.hit or w.answer == answer for w in warm)
        # Blocks of the same queries in turn: the default (wake off), the store's wake-up PING on, and
        # the verifier off (with the old cross-encoder, its 10-20 ms pass slowed the next fetch).
        modes = {
            "wake_off": (False, cache.verifier),
            "wake_on": (True, cache.verifier),
            "no_verifier": (False, None),
        }
        runs: dict[str, list] = {m: [] for m in modes}
        verifier = cache.verifier
        with GcInSpans() as gcs:
            for n, b in enumerate(range(0, n_queries, WAKE_BLOCK)):
                names = list(modes)
                for mode in names[n % 3 :] + names[: n % 3]:
                    cache.store.wake_enabled, cache.verifier = modes[mode]
                    for q, v in zip(queries[b : b + WAKE_BLOCK], qv[b : b + WAKE_BLOCK], strict=True):
                        with gcs.span():
                            r = cache.lookup(q, "bench", category="default", vector=v)
                        runs[mode].append((r, gcs.last))
        cache.store.wake_enabled, cache.verifier = cache.config.redis_wake, verifier
        res = [r for r, _ in runs["wake_on" if cache.config.redis_wake else "wake_off"]]  # the default
        sf = np.array([r.timings_ms["search_fetch"] for r in res])
        fetched = np.array([r.similarity is not None and r.similarity >= r.threshold for r in res])
        verified = np.array([r.p_same is not None for r in res])
        ver = np.array([r.timings_ms["verify"] for r in res])
        e2e_q = queries[n_queries : n_queries + n_e2e]
        embedder.clear_cache()  # end to end means the model runs: no query may come from the LRU
        e2e = [cache.lookup(q, "bench", category="default").timings_ms for q in e2e_q]
        total = np.array([t["total"] for t in e2e])
        embed_sf = np.array([t["total"] - t["verify"] for t in e2e])
        return {
            "entries": size,
            "synthetic_entries": int(size - len(real)),
            "insert_per_s": size / insert_s,
            "queries": n_queries,
            # search + document fetch, embedding excluded (the vector is passed in), verification excluded
            "search_fetch_ms": _pcts(sf),
            "with_document_fetch": int(fetched.sum()),
            "with_fetch_ms": _pcts(sf[fetched]),
            # the verification stage alone, on the lookups that ran it (a candidate above the threshold)
            "verified_lookups": int(verified.sum()),
            "verify_ms": _pcts(ver[verified]),
            # search + fetch + verification, embedding excluded: the whole lookup once a vector exists
            "search_fetch_verify_ms": _pcts(sf + ver),
            "end_to_end_queries": len(e2e_q),
            # embedding included: the query embedded by the model (no LRU hit), verification excluded
            "embed_search_fetch_ms": _pcts(embed_sf),
            # the whole lookup: embedding + search + fetch + verification
            "lookup_ms": _pcts(total),
            "hit_rate": float(np.mean([r.hit for r in res])),
            "load_average_before_after": [list(load_before), list(os.getloadavg())],
            **{mode: _tail(rows) for mode, rows in runs.items()},
        }
    finally:
        cache.store.clear()


WAKE_BLOCK = 50  # lookups per block; blocks rotate wake off / wake on / verifier off


def _pcts(x: np.ndarray) -> list[float] | None:
    """[p50, p99] in ms, or None without samples."""
    return [float(np.percentile(x, 50)), float(np.percentile(x, 99))] if x.size else None


class GcInSpans:
    """Counts the garbage collector's passes that run inside timed spans (gc.callbacks)."""

    def __init__(self) -> None:
        self.last = 0  # collections in the latest span
        self._inside, self._n = False, 0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start" and self._inside:
            self._n += 1

    def __enter__(self) -> GcInSpans:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    @contextlib.contextmanager
    def span(self):
        self._n, self._inside = 0, True
        try:
            yield
        finally:
            self._inside, self.last = False, self._n


def _tail(rows: list) -> dict:
    """search+fetch p50/p99 of (LookupResult, gc passes) rows; lookups that fetched; the fetch alone; GC."""
    sf = np.array([r.timings_ms["search_fetch"] for r, _ in rows])
    f = np.array([r.similarity is not None and r.similarity >= r.threshold for r, _ in rows])
    fetch = np.array([r.timings_ms["fetch"] for r, _ in rows])
    with_gc = np.array([n > 0 for _, n in rows])
    top = sf >= np.percentile(sf, 99)

    def pct(x: np.ndarray, q: float) -> float | None:
        return float(np.percentile(x, q)) if x.size else None

    return {
        "lookups": len(rows),
        "search_fetch_ms_p50": pct(sf, 50),
        "search_fetch_ms_p99": pct(sf, 99),
        "with_fetch_ms_p50": pct(sf[f], 50),
        "with_fetch_ms_p99": pct(sf[f], 99),
        "fetch_only_ms_p50": pct(fetch[f], 50),
        "fetch_only_ms_p99": pct(fetch[f], 99),
        "lookups_with_gc_in_span": int(with_gc.sum()),
        "slowest_1pct_with_gc": int((with_gc & top).sum()),
    }


def round_trip_after_pause(redis_url: str, reps: int = 200) -> dict:
    """A 2-document fetch (RedisStore.get_many) after a pause of 0-20 ms, idle (sleep) or busy (spin),
    interleaved: how much a round trip costs when Redis has had nothing to do for a while."""
    from semcache.redis_store import RedisStore
    from semcache.scope import Scope
    from semcache.store import Entry

    store = RedisStore(redis_url, f"kvfuse-bench:semcache-rtt:{os.getpid()}:", wake=False)
    vec = np.zeros(384, np.float32)
    ids = [f"doc{i}" for i in range(2)]
    for i in ids:
        store.put(Entry(i, Scope("bench", "default", "default"), "q?", "A cached answer. " * 30, vec))

    def spin(s: float) -> None:
        t = time.perf_counter()
        while time.perf_counter() - t < s:
            pass

    conds = [(kind, ms) for kind in ("sleep", "spin") for ms in (0, 1, 5, 20)]
    times: dict = {c: [] for c in conds}
    rng = np.random.default_rng(0)
    try:
        for _ in range(reps):
            for k in rng.permutation(len(conds)):
                kind, ms = conds[k]
                (time.sleep if kind == "sleep" else spin)(ms / 1e3)
                t0 = time.perf_counter()
                store.get_many(ids)
                times[(kind, ms)].append((time.perf_counter() - t0) * 1e3)
    finally:
        store.clear()
    return {
        f"{kind}_{ms}ms": [float(np.percentile(v, 50)), float(np.percentile(v, 99))]
        for (kind, ms), v in times.items()
    }


def embedding_speed(embedder: Embedder, texts: list[str]) -> dict:
    out = {}
    for batch in (1, 32, 128):
        fresh = Embedder(embedder.config.__class__(batch_size=batch, lru_size=0))
        sample = texts[: 64 if batch == 1 else 512]
        t0 = time.perf_counter()
        fresh.embed(sample)
        out[f"batch_{batch}_per_s"] = len(sample) / (time.perf_counter() - t0)
    single = Embedder(embedder.config.__class__(lru_size=0))
    times = []
    for t in texts[:100]:
        t0 = time.perf_counter()
        single.embed_one(t)
        times.append((time.perf_counter() - t0) * 1e3)
    out["one_query_ms_p50"], out["one_query_ms_p99"] = (
        float(np.percentile(times, 50)),
        float(np.percentile(times, 99)),
    )
    return out


def llm_ms(tokens: int) -> float:
    """Median time for the default model to answer a short question (prefill + `tokens` greedy tokens)."""
    import torch

    from engine.loader import load_model

    loaded = load_model()
    ids = loaded.tokenizer("What are the health benefits of regular exercise?", return_tensors="pt").input_ids
    times = []
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            loaded.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def plot(q: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, style in (("global_threshold", "o-"), ("per_category_thresholds", "s-"), ("verifier", "^-")):
        pts = sorted((r, p) for _, p, r in q["curves"][name])
        ax.plot([r for r, _ in pts], [p for _, p in pts], style, ms=3, label=name.replace("_", " "))
    d = q["cache_default"]
    ax.plot([d["recall"]], [d["precision"]], "k*", ms=12, label="cache defaults")
    op = q.get("verifier_at_validation_cut")
    if op:
        ax.plot(
            [op["recall"]],
            [op["precision"]],
            "gD",
            ms=7,
            label=f"verifier, cut {op['cut']:.2f} from validation",
        )
    ax.axhline(0.90, color="grey", lw=0.6, ls="--")
    ax.axvline(0.40, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("recall (label-1 pairs served)")
    ax.set_ylabel("precision (hits that are label 1)")
    ax.set_title(f"QQP held-out pairs (n={q['held_out_pairs']}), all-MiniLM-L6-v2")
    ax.set_xlim(0, 1)
    ax.set_ylim(0.6, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4,000 pairs; latency at 2k and 10k entries")
    ap.add_argument("--sizes", type=int, nargs="+", help="entry counts for the latency part")
    ap.add_argument("--redis", default=os.environ.get("KVFUSE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--llm-ms", type=float, help="time of a full LLM answer (default: measured, 64 tokens)")
    ap.add_argument("--plot", type=Path, default=OUT / "semcache.png")
    ap.add_argument("--latency-only", action="store_true", help="skip the quality part (minutes)")
    ap.add_argument("--verifier", type=Path, help="verifier weights (default: the package's)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on the shared 2 cores, 2 threads made one embedding 7x slower)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    pairs = load_pairs()
    train, test = split_pairs(pairs)  # over the whole file: --quick keeps the shipped verifier's split
    if args.quick:
        train, test = train[:2000], test[:2000]
        pairs = train + test
    sizes = args.sizes or ([2000, 10000] if args.quick else [10000, 100000])
    n_queries, n_e2e = (500, 100) if args.quick else (2000, 500)
    embedder = Embedder()
    vec_of = embed_cached(embedder, [t for p in pairs for t in (p["text_a"], p["text_b"])])
    q = None if args.latency_only else quality(train, test, vec_of, embedder, args.verifier)
    rng = np.random.default_rng(0)
    queries = sorted({p["text_b"] for p in test})
    rng.shuffle(queries)
    queries = queries[: n_queries + n_e2e]
    entries = sorted(set(vec_of) - set(queries))  # the asked questions themselves are never cached
    rng.shuffle(entries)
    lat = [
        latency(n, entries, vec_of, queries, embedder, args.redis, n_queries, n_e2e, args.verifier)
        for n in sizes
    ]
    rtt = round_trip_after_pause(args.redis)
    emb = embedding_speed(embedder, queries)
    t_llm = args.llm_ms or llm_ms(64)
    big = lat[-1]
    # a miss costs embedding and search; verification runs only when a candidate passed the threshold
    t_embed, t_search = emb["one_query_ms_p50"], big["search_fetch_ms"][0]
    t_fetch = big["with_fetch_ms"][0] - t_search if big["with_fetch_ms"] else 0.0
    report = {
        "bench": "semcache",
        "quick": args.quick,
        "pairs": len(pairs),
        "torch_threads": args.threads,
        "verifier": str(args.verifier or DEFAULT_WEIGHTS),
        "quality": {k: v for k, v in q.items() if k != "curves"} if q else None,
        "latency": lat,
        "redis_round_trip_after_pause_ms_p50_p99": rtt,
        "load_average": os.getloadavg(),
        "embedding": emb,
        "llm_answer_ms": t_llm,
        "break_even_hit_rate": (t_embed + t_search) / (t_llm - max(t_fetch, 0.0)),
        "seconds": time.perf_counter() - t_start,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "semcache.json").write_text(json.dumps({**report, "curves": q["curves"] if q else None}, indent=2))
    if q:
        plot(q, args.plot)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
