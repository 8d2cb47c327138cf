"""Fitting the verifier on labelled question pairs, and the train/held-out split the benchmark shares.

QQP questions repeat across pairs, so a split by pair (or by one side's text) lets a held-out question
be seen in training. Here the pairs are grouped into connected components of the graph whose nodes are
question texts and whose edges are pairs; a component goes whole to one side, by a hash of its
smallest question. No question text therefore appears on both sides. The split is computed over the
whole file, so a subset (the benchmark's --quick) is still disjoint from what the shipped weights saw.

Within the training side, components go 80/20 to a fit part and a calibration part the same way:
the cross-encoder is fine-tuned on the fit part, and the small stacking network over its logit and
the lexical features, plus the cut for a target precision, on the calibration part. Only pairs whose
cosine reaches the floor are used: the verifier never sees the others in the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from engine.paths import data_dir, kvfuse_home
from semcache.embed import Embedder

TRAIN_FLOOR = 0.70  # the cross-encoder learns from a little below the lowest category threshold (0.80)
STACK_FLOOR = 0.80  # the stacker and the cut only from pairs the cache would verify


def default_pairs() -> Path:
    return data_dir() / "semcache" / "qqp_pairs_dev.json"


def load_pairs(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    path = Path(path) if path else default_pairs()
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all({"text_a", "text_b", "label"} <= set(r) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of {{text_a, text_b, label}} objects")
    return rows[:limit] if limit else rows


def component_keys(pairs: list[dict]) -> list[str]:
    """Per pair, the smallest question text of its connected component (union-find over texts)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        a, b = root(p["text_a"]), root(p["text_b"])
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smaller text stays root: the key is order-free
    return [root(p["text_a"]) for p in pairs]


def _byte(key: str, i: int) -> int:
    return hashlib.blake2b(key.encode(), digest_size=4).digest()[i]


def split_pairs(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held_out), about half each, disjoint by question text."""
    held = [_byte(k, 0) % 2 == 1 for k in component_keys(pairs)]
    return [p for p, h in zip(pairs, held, strict=True) if not h], [
        p for p, h in zip(pairs, held, strict=True) if h
    ]


def split_train(train: list[dict]) -> tuple[list[dict], list[dict]]:
    """(fit, calibration), about 80/20 of the training side, disjoint by question text."""
    calib = [_byte(k, 1) % 5 == 0 for k in component_keys(train)]
    return [p for p, c in zip(train, calib, strict=True) if not c], [
        p for p, c in zip(train, calib, strict=True) if c
    ]


def embed_cached(
    embedder: Embedder, texts: list[str], cache_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """Embeddings of `texts`, kept in $KVFUSE_HOME/semcache-embeddings (the full QQP set takes minutes)."""
    texts = sorted(set(texts))
    digest = hashlib.blake2b(("\n".join(texts) + embedder.model_id).encode(), digest_size=10).hexdigest()
    folder = cache_dir or kvfuse_home() / "semcache-embeddings"
    path = folder / f"{digest}.npy"
    if path.is_file():
        vecs = np.load(path, allow_pickle=False)
    else:
        vecs = embedder.embed(texts)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs, allow_pickle=False)
    return dict(zip(texts, vecs, strict=True))


def cosines(pairs: list[dict], vec_of: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([float(np.dot(vec_of[p["text_a"]], vec_of[p["text_b"]])) for p in pairs], np.float32)


def columns(pairs: list[dict], vec_of: dict[str, np.ndarray]):
    """(queries = text_b, cached = text_a, their vectors, labels)."""
    q, c = [p["text_b"] for p in pairs], [p["text_a"] for p in pairs]
    U, V = np.stack([vec_of[t] for t in q]), np.stack([vec_of[t] for t in c])
    return q, c, U, V, np.array([int(p["label"]) for p in pairs])


def choose_cut(prob: np.ndarray, y: np.ndarray, target_precision: float) -> float:
    """The lowest cut whose precision on (prob, y) reaches the target (most recall at that precision)."""
    order = np.argsort(-prob)
    precision = np.cumsum(y[order]) / np.arange(1, len(y) + 1)
    ok = np.nonzero(precision >= target_precision)[0]
    if ok.size == 0:
        raise ValueError(f"no cut reaches precision {target_precision} on these pairs")
    return float(prob[order][ok.max()])


def train_pair_encoder(
    encoder,
    cached: list[str],
    queries: list[str],
    labels: np.ndarray,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 5e-5,
    seed: int = 0,
    log=print,
) -> None:
    """Fine-tune the encoder's upper layers and head (AdamW, linear warm-up and decay).

    The frozen lower layers run once per pair; their output is kept (float16) and reused every epoch,
    which more than halves the cost of an epoch on the CPU.
    """
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n = len(cached)
    by_len = sorted(range(n), key=lambda i: len(cached[i]) + len(queries[i]))
    states: list = [None] * n
    t0 = time.perf_counter()
    for s in range(0, n, 64):
        rows = by_len[s : s + 64]
        enc = encoder.tokenize([cached[i] for i in rows], [queries[i] for i in rows])
        hidden = encoder.lower(enc)
        for j, i in enumerate(rows):
            states[i] = hidden[j, : int(enc["attention_mask"][j].sum())].to(torch.float16)
    log(f"lower layers over {n} pairs: {time.perf_counter() - t0:.0f} s")
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": list(encoder.top.parameters()), "lr": lr},
            {"params": list(encoder.head.parameters()), "lr": 20 * lr},
        ],
        weight_decay=0.01,
    )
    steps = epochs * math.ceil(n / batch_size)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warm, max(0.0, (steps - k) / max(steps - warm, 1)))
    )
    y = torch.from_numpy(np.asarray(labels, np.float32))
    encoder.train()
    try:
        for epoch in range(epochs):
            t0, total = time.perf_counter(), 0.0
            # batches of similar length (little padding), in random order, different each epoch
            jitter = np.array([len(cached[i]) + len(queries[i]) for i in range(n)]) + rng.uniform(0, 12, n)
            order = np.argsort(jitter)
            batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
            rng.shuffle(batches)
            for rows in batches:
                lens = [len(states[i]) for i in rows]
                hidden = torch.zeros(len(rows), max(lens), states[rows[0]].shape[-1])
                mask = torch.zeros(len(rows), max(lens), dtype=torch.long)
                for j, i in enumerate(rows):
                    hidden[j, : lens[j]] = states[i].float()
                    mask[j, : lens[j]] = 1
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    encoder.upper(hidden, mask), y[torch.from_numpy(np.asarray(rows))]
                )
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(rows)
            log(f"epoch {epoch + 1}/{epochs}: loss {total / n:.4f}, {time.perf_counter() - t0:.0f} s")
    finally:
        encoder.eval()


def fit_verifier(
    train: list[dict],
    vec_of: dict[str, np.ndarray],
    target_precision: float | None = None,
    epochs: int = 1,
    frozen_layers: int = 3,
    log=print,
):
    """Cross-encoder on the fit part, stacker (and cut) on the calibration part; cut 0.5 by default."""
    from semcache.cross_encoder import PairEncoder
    from semcache.verify import Verifier

    fit_side, calib = split_train(train)
    fit_side = [p for p, c in zip(fit_side, cosines(fit_side, vec_of), strict=True) if c >= TRAIN_FLOOR]
    calib = [p for p, c in zip(calib, cosines(calib, vec_of), strict=True) if c >= STACK_FLOOR]
    encoder = PairEncoder(frozen_layers)
    q, c, _, _, y = columns(fit_side, vec_of)
    log(f"cross-encoder: {len(fit_side)} pairs (cosine >= {TRAIN_FLOOR}), {int(y.sum())} label 1")
    train_pair_encoder(encoder, c, q, y, epochs=epochs, log=log)
    q, c, U, V, y = columns(calib, vec_of)
    log(f"stacker: {len(calib)} calibration pairs (cosine >= {STACK_FLOOR})")
    verifier = Verifier.fit_stacker(encoder, q, c, U, V, y)
    if target_precision is not None:
        verifier.cut = choose_cut(verifier.p_same_many(q, c, U, V), y, target_precision)
    return verifier, {"fit_pairs": len(fit_side), "calibration_pairs": len(calib)}


def fit_verifier_cli(
    pairs_path: str | None,
    out: str | None,
    limit: int | None,
    target_precision: float | None,
    epochs: int = 1,
) -> dict:
    import torch

    from semcache.verify import DEFAULT_WEIGHTS

    torch.set_num_threads(1)  # shared cores: more threads were slower, not faster
    t0 = time.perf_counter()
    pairs = load_pairs(pairs_path)
    train, held_out = split_pairs(pairs)  # over the whole file, so --limit keeps the same split
    train = train[:limit] if limit else train
    embedder = Embedder()
    vec_of = embed_cached(embedder, [t for p in pairs for t in (p["text_a"], p["text_b"])])
    verifier, sizes = fit_verifier(train, vec_of, target_precision, epochs=epochs)
    path = Path(out) if out else DEFAULT_WEIGHTS
    verifier.save(path)
    return {
        "weights": str(path),
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        **sizes,
        "cut": verifier.cut,
        "target_precision": target_precision,
        "seconds": time.perf_counter() - t0,
    }
