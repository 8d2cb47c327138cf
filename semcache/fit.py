"""Fitting the verifier on labelled question pairs, and the train/held-out split the benchmark shares.

QQP questions repeat across pairs, so a split by pair (or by one side's text) lets a held-out question
be seen in training. Here the pairs are grouped into connected components of the graph whose nodes are
question texts and whose edges are pairs; a component goes whole to one side, by a hash of its
smallest question. No question text therefore appears on both sides. The split is computed over the
whole file, so a subset (the benchmark's --quick) is still disjoint from what the shipped weights saw.

Within the training side, components go 80/20 to a fit part and a calibration part the same way:
the cross-encoder is fine-tuned on the fit part, and the small stacking network over its logit and
the lexical features on the calibration part. Only pairs whose cosine reaches the floor are used: the
verifier never sees the others in the cache.

The calibration part is also the validation set, so the held-out half is never used to choose
anything: after each epoch the stacker is refitted in 5 folds (by component) over the calibration
pairs, and its out-of-fold P(same) gives the precision at recall >= 0.40 (recall counted over every
label-1 calibration pair, also those below the floor, as on the held-out side). The best epoch is
kept, and its out-of-fold predictions choose the operating cut (`validation` in the weights' metadata).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.paths import data_dir, kvfuse_home
from semcache.embed import Embedder

TRAIN_FLOOR = 0.70  # the cross-encoder learns from a little below the lowest category threshold (0.80)
STACK_FLOOR = 0.80  # the stacker and the cut only from pairs the cache would verify
MIN_RECALL = 0.40  # the target is precision at recall >= 0.40
# The operating cut is chosen for a little more recall than the target on validation, so that the
# held-out recall (a sample of its own) stays at or above the target.
RECALL_MARGIN = 0.02
VALIDATION_FOLDS = 5


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


def _cuts(prob: np.ndarray, y: np.ndarray, positives: int):
    """(cut, precision, recall) at every distinct cut, most confident first; recall over `positives`."""
    order = np.argsort(-prob, kind="stable")
    ps, tp = prob[order], np.cumsum(y[order])
    last = np.r_[ps[1:] != ps[:-1], True]  # a cut takes a tie group whole
    k = np.nonzero(last)[0]
    return ps[k], tp[k] / (k + 1), tp[k] / max(positives, 1)


def precision_at_recall(prob: np.ndarray, y: np.ndarray, positives: int, min_recall: float) -> dict | None:
    """The best precision over cuts whose recall reaches `min_recall`, with that cut."""
    cut, precision, recall = _cuts(prob, y, positives)
    ok = np.nonzero(recall >= min_recall)[0]
    if ok.size == 0:
        return None
    i = ok[np.argmax(precision[ok])]
    return {"precision": float(precision[i]), "recall": float(recall[i]), "cut": float(cut[i])}


def cut_for_recall(prob: np.ndarray, y: np.ndarray, positives: int, recall_target: float) -> float:
    """The highest cut whose recall reaches the target (the most precise such cut, on these pairs)."""
    cut, _, recall = _cuts(prob, y, positives)
    ok = np.nonzero(recall >= recall_target)[0]
    if ok.size == 0:
        raise ValueError(f"no cut reaches recall {recall_target} on these pairs")
    return float(cut[ok.min()])


def validate(
    encoder, calib: list[dict], vec_of: dict[str, np.ndarray], folds: int = VALIDATION_FOLDS
) -> dict:
    """Out-of-fold P(same) on the calibration pairs above the floor, and precision at MIN_RECALL.

    The stacker is refitted on 4/5 of the components and predicts the other 1/5, so no prediction
    comes from a stacker that saw the pair (or any pair sharing a question with it).
    """
    from semcache.verify import Verifier, opposite_words, same_words, stack_features

    cos_all = cosines(calib, vec_of)
    positives = int(sum(int(p["label"]) for p in calib))
    above = np.nonzero(cos_all >= STACK_FLOOR)[0]
    pairs = [calib[i] for i in above]
    q, c, _, _, y = columns(pairs, vec_of)
    X = stack_features(q, c, cos_all[above], encoder.logits(c, q))
    keys = component_keys(calib)  # over all calibration pairs: a component links also through low pairs
    fold = np.array([_byte(keys[i], 2) % folds for i in above])
    oof = np.zeros(len(pairs), np.float64)
    for f in range(folds):
        part = fold == f
        oof[part] = Verifier.fit_stacker_on(encoder, X[~part], y[~part]).probability(X[part])
    oof[np.array([opposite_words(a, b) for a, b in zip(q, c, strict=True)], dtype=bool)] = 0.0
    oof[np.array([same_words(a, b) for a, b in zip(q, c, strict=True)], dtype=bool)] = 1.0  # as p_same_many
    return {
        "X": X,
        "y": y,
        "oof": oof,
        "positives": positives,
        "pairs": len(pairs),
        "verifier": precision_at_recall(oof, y, positives, MIN_RECALL),
        "cross_logit": precision_at_recall(X[:, -1], y, positives, MIN_RECALL),
        "cosine": precision_at_recall(X[:, 0], y, positives, MIN_RECALL),
    }


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
    on_epoch: Callable[[int, float], None] | None = None,
) -> None:
    """Fine-tune the encoder's upper layers and head (AdamW, linear warm-up and decay).

    The frozen lower layers run once per pair; their output is kept (float16) and reused every epoch,
    which more than halves the cost of an epoch on the CPU. `on_epoch(epoch, loss)` runs after each
    epoch with the encoder in eval mode (validation, checkpoints).
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
            batches = [order[s : s + batch_size].tolist() for s in range(0, n, batch_size)]
            rng.shuffle(batches)
            for b, rows in enumerate(batches):
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
                if (b + 1) % 50 == 0:  # progress, so a slow epoch on busy cores can be projected
                    log(f"  batch {b + 1}/{len(batches)}, {time.perf_counter() - t0:.0f} s")
            log(f"epoch {epoch + 1}/{epochs}: loss {total / n:.4f}, {time.perf_counter() - t0:.0f} s")
            if on_epoch is not None:
                encoder.eval()
                on_epoch(epoch + 1, total / n)
                encoder.train()
    finally:
        encoder.eval()


def _finish(encoder, val: dict, record: dict, target_precision: float | None):
    """The stacker on all calibration pairs; cut 0.5, or chosen on out-of-fold predictions."""
    from semcache.verify import Verifier

    verifier = Verifier.fit_stacker_on(encoder, val["X"], val["y"])
    if target_precision is not None:
        verifier.cut = choose_cut(val["oof"], val["y"], target_precision)
    operating = round(MIN_RECALL + RECALL_MARGIN, 4)
    record = {
        **record,
        "operating_recall": operating,
        "operating_cut": cut_for_recall(val["oof"], val["y"], val["positives"], operating),
    }
    return verifier, record


def fit_verifier(
    train: list[dict],
    vec_of: dict[str, np.ndarray],
    target_precision: float | None = None,
    epochs: int = 1,
    frozen_layers: int = 3,
    checkpoints: Path | None = None,
    both_orders: bool = False,
    train_floor: float = TRAIN_FLOOR,
    log=print,
):
    """Cross-encoder on the fit part, the epoch and the stacker on the calibration part.

    Returns (verifier, record): the record (per-epoch validation, the epoch kept, the operating cut for
    recall MIN_RECALL + RECALL_MARGIN on validation) is stored in the weights' metadata. With
    `checkpoints`, every epoch's verifier is written there too, so a stopped run keeps its best epoch.
    `both_orders` also trains each pair with its two questions swapped (same meaning either way round;
    twice the pairs per epoch).
    """
    from semcache.cross_encoder import PairEncoder

    fit_side, calib = split_train(train)
    if not 0.0 <= train_floor <= STACK_FLOOR:
        raise ValueError(f"train_floor must be in [0, {STACK_FLOOR}], got {train_floor}")
    fit_side = [p for p, c in zip(fit_side, cosines(fit_side, vec_of), strict=True) if c >= train_floor]
    encoder = PairEncoder(frozen_layers)
    q, c, _, _, y = columns(fit_side, vec_of)
    log(f"cross-encoder: {len(fit_side)} pairs (cosine >= {train_floor}), {int(y.sum())} label 1")
    if both_orders:
        c, q, y = c + q, q + c, np.concatenate([y, y])
    record: dict = {
        "fit_pairs": len(fit_side),
        "both_orders": both_orders,
        "train_floor": train_floor,
        "frozen_layers": frozen_layers,
        "calibration_pairs": len(calib),
        "epochs": [],
    }
    best: dict = {"precision": -1.0}

    def on_epoch(epoch: int, loss: float) -> None:
        t0 = time.perf_counter()
        val = validate(encoder, calib, vec_of)
        row = {"epoch": epoch, "loss": round(loss, 4)}
        row.update({k: val[k] for k in ("verifier", "cross_logit", "cosine")})
        record["epochs"].append(row)
        record["validation_pairs"], record["validation_positives"] = val["pairs"], val["positives"]
        log(f"validation ({time.perf_counter() - t0:.0f} s): {json.dumps(row)}")
        precision = val["verifier"]["precision"] if val["verifier"] else 0.0
        if precision > best["precision"]:
            best.update(precision=precision, epoch=epoch, tensors=encoder.trained_tensors(), val=val)
        if checkpoints is not None:
            checkpoints.mkdir(parents=True, exist_ok=True)
            verifier, rec = _finish(encoder, val, {**record, "kept_epoch": epoch}, target_precision)
            verifier.save(checkpoints / f"epoch{epoch}.safetensors", {"validation": json.dumps(rec)})

    train_pair_encoder(encoder, c, q, y, epochs=epochs, log=log, on_epoch=on_epoch)
    encoder.load_trained(best["tensors"])  # the best epoch on validation, not the last
    log(f"kept epoch {best['epoch']} of {epochs}")
    return _finish(encoder, best["val"], {**record, "kept_epoch": best["epoch"]}, target_precision)


def fit_verifier_cli(
    pairs_path: str | None,
    out: str | None,
    limit: int | None,
    target_precision: float | None,
    epochs: int = 1,
    checkpoints: str | None = None,
    both_orders: bool = False,
    frozen_layers: int = 3,
    train_floor: float = TRAIN_FLOOR,
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
    folder = Path(checkpoints) if checkpoints else kvfuse_home() / "semcache-verifier-checkpoints"
    verifier, record = fit_verifier(
        train,
        vec_of,
        target_precision,
        epochs=epochs,
        frozen_layers=frozen_layers,
        checkpoints=folder,
        both_orders=both_orders,
        train_floor=train_floor,
    )
    path = Path(out) if out else DEFAULT_WEIGHTS
    verifier.save(path, {"validation": json.dumps(record)})
    return {
        "weights": str(path),
        "bytes": path.stat().st_size,
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        **record,
        "cut": verifier.cut,
        "target_precision": target_precision,
        "seconds": time.perf_counter() - t0,
    }
