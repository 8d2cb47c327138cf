"""Fitting the pair-model verifier: a fine-tuned MiniLM cross-encoder with the word features stacked on it.

Everything is chosen on the training half of semcache/fit.py's split. The stacker (the same small
networks as the word-feature verifier, one more input: the pair model's logit) must learn from logits
of pairs the pair model never saw, so the training half is cut in two by component (hash byte 2) and
a pair model is fine-tuned on each half (`cross --half 0|1`, two processes side by side); each
predicts the other half: out-of-fold logits for every training pair. `stack` runs the 5-fold
validation of semcache/fit.py on the word features plus that logit (same folds, seeds, IDF tables as
the word-feature verifier's). `ship` writes the verifier file: networks fitted on all training pairs
with their out-of-fold logits, the half-0 pair model (its logits are distributed like the ones the
networks learnt from; a model refitted on the whole half would not be), the validation record.
The whole fit, ~75 minutes on 2 busy cores (`all`; intermediate files in $KVFUSE_HOME/semcache-pair-fit):

    OMP_NUM_THREADS=1 nice -n 5 python -m semcache.fit_pair all --out verifier_pair.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from engine.paths import kvfuse_home
from semcache.fit import TRAIN_FLOOR, _byte, component_keys, cosines, embed_cached, load_pairs, split_pairs

HALVES = 2


def work_dir() -> Path:
    return kvfuse_home() / "semcache-pair-fit"


def half_of(train: list[dict]) -> np.ndarray:
    """Cross-fitting half of each training pair, whole components per half (byte 2: its own)."""
    return np.array([_byte(k, 2) % HALVES for k in component_keys(train)])


def _data(floor: float):
    from semcache.embed import Embedder

    pairs = load_pairs()
    train, _ = split_pairs(pairs)
    vec_of = embed_cached(Embedder(), [t for p in pairs for t in (p["text_a"], p["text_b"])])
    cos = cosines(train, vec_of)
    return train, vec_of, cos, np.nonzero(cos >= floor)[0]


def _texts(train: list[dict], rows: np.ndarray):
    cached = [train[i]["text_a"] for i in rows]
    queries = [train[i]["text_b"] for i in rows]
    return cached, queries, np.array([int(train[i]["label"]) for i in rows])


def cross(
    half: int, floor: float, params, limit: int | None, checkpoint: Path | None = None, log=print
) -> dict:
    """Fine-tune on the other half's pairs above `floor` (or load `checkpoint`, a model fine-tuned
    so, e.g. an earlier epoch's); out-of-fold logits for this half's."""
    from safetensors.numpy import load_file, save_file

    from semcache.pair_model import PairModel, train_pair_model

    train, _, _, rows = _data(floor)
    h = half_of(train)
    fit_rows, oof_rows = rows[h[rows] != half], rows[h[rows] == half]
    fit_rows = fit_rows[:limit] if limit else fit_rows
    model = PairModel()
    out = work_dir()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def on_epoch(epoch: int, loss: float) -> None:
        save_file(model.trained_tensors(), str(out / f"half{half}.epoch{epoch}.safetensors"))

    if checkpoint:
        model.load_trained(load_file(str(checkpoint)))
    else:
        c, q, y = _texts(train, fit_rows)
        train_pair_model(model, c, q, y, params, on_epoch, log)
    fit_s = time.perf_counter() - t0
    save_file(model.trained_tensors(), str(out / f"half{half}.safetensors"))
    c, q, _ = _texts(train, oof_rows)
    logits = model.logits(c, q)
    np.save(out / f"oof{half}.npy", np.stack([oof_rows.astype(np.float32), logits]), allow_pickle=False)
    return {"half": half, "fit_pairs": len(fit_rows), "oof_pairs": len(oof_rows), "fit_s": fit_s,
            "predict_ms_per_pair": (time.perf_counter() - t0 - fit_s) * 1e3 / max(len(oof_rows), 1)}  # fmt: skip


def oof_logits(n_train: int) -> np.ndarray:
    """Out-of-fold logit per training pair (NaN below the floor), from both halves' files."""
    out = np.full(n_train, np.nan, np.float32)
    for half in range(HALVES):
        rows, logits = np.load(work_dir() / f"oof{half}.npy", allow_pickle=False)
        out[rows.astype(int)] = logits
    return out


def stack(floor: float, log=print) -> dict:
    """5-fold validation of the networks over the word features and the out-of-fold logit (the folds,
    seeds and IDF tables of the word-feature verifier's validation, whose record is copied beside it
    for comparison), and the logit alone; the record goes to stack.json."""
    from semcache.fit import (
        MIN_RECALL,
        RECALL_MARGIN,
        VERIFY_FLOOR,
        cut_for_recall,
        precision_at_recall,
        validate,
    )
    from semcache.verify import weights_metadata

    train, vec_of, cos, _ = _data(floor)
    logit = oof_logits(len(train))
    y = np.array([int(p["label"]) for p in train])
    above = cos >= VERIFY_FLOOR
    stacked = validate(train, vec_of, train_floor=floor, log=log, extra=logit)
    operating = round(MIN_RECALL + RECALL_MARGIN, 4)
    keys = ("verifier", "cosine", "per_fold_precision", "per_fold_mean_std")
    record = {
        "train_pairs": len(train),
        "fit_pairs": int((cos >= floor).sum()),
        "train_floor": floor,
        "validation_pairs": stacked["pairs"],
        "validation_positives": stacked["positives"],
        "validation": {k: stacked[k] for k in keys},
        "validation_words_only": json.loads(weights_metadata()["validation"])["validation"],
        "validation_logit_alone": precision_at_recall(logit[above], y[above], int(y.sum()), MIN_RECALL),
        "operating_recall": operating,
        "operating_cut": cut_for_recall(stacked["oof"], stacked["y"], stacked["positives"], operating),
    }
    np.save(
        work_dir() / "stack_oof.npy",
        np.stack([np.nonzero(above)[0], stacked["oof"], stacked["y"]]).astype(np.float32),
        allow_pickle=False,
    )
    (work_dir() / "stack.json").write_text(json.dumps(record, indent=1))
    return record


def ship(floor: float, out: Path, seeds: int = 3) -> dict:
    """The verifier file: networks over the word features and the out-of-fold logit of every training
    pair above `floor`, the half-0 pair model, stack.json's record."""
    from safetensors.numpy import load_file

    from semcache.fit import _features, _fit_nets
    from semcache.mlp import MlpParams
    from semcache.pair_features import IdfTable
    from semcache.pair_model import PairModel
    from semcache.verify import Verifier

    train, vec_of, _, rows = _data(floor)
    record = json.loads((work_dir() / "stack.json").read_text())
    model = PairModel()
    model.load_trained(load_file(str(work_dir() / "half0.safetensors")))
    y = np.array([int(p["label"]) for p in train])
    idf = IdfTable.from_texts([t for p in train for t in (p["text_a"], p["text_b"])])
    X = _features(train, vec_of, rows, idf, oof_logits(len(train)))
    nets = _fit_nets(X, y[rows], MlpParams(), tuple(range(seeds)))
    record["pair_model"] = "half 0 (fine-tuned on the half-1 pairs)"
    Verifier(nets, idf, pair=model).save(out, {"validation": json.dumps(record)})
    return {"weights": str(out), "bytes": out.stat().st_size, **record}


def run_all(floor: float, epochs: int, stop_after: int, out: Path) -> dict:
    """Both halves in parallel (one thread each), then stack and ship."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "semcache.fit_pair", "cross", "--floor", str(floor), "--epochs", str(epochs)]
    cmd += ["--stop-after", str(stop_after)]
    procs = [subprocess.Popen([*cmd, "--half", str(h)]) for h in range(HALVES)]
    if any(p.wait() for p in procs):
        raise RuntimeError("a cross-fitting half failed")
    stack(floor)
    return ship(floor, out)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("cross", "stack", "ship", "all"))
    ap.add_argument("--half", type=int, choices=range(HALVES))
    ap.add_argument("--floor", type=float, default=TRAIN_FLOOR, help="pairs with cosine >= this are learnt")
    ap.add_argument("--epochs", type=int, default=2, help="the learning-rate schedule's length")
    ap.add_argument(
        "--stop-after", type=int, default=1, help="epochs run (1: the measured fit stopped there)"
    )
    ap.add_argument("--limit", type=int, help="fit on the first N pairs only (timing)")
    ap.add_argument("--out", type=Path, help="ship, all: where to write the verifier")
    ap.add_argument("--checkpoint", type=Path, help="use these pair-model tensors, do not fine-tune")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from semcache.pair_model import PairTrainParams

    params = PairTrainParams(epochs=args.epochs, stop_after=args.stop_after)
    if args.stage == "cross":
        if args.half is None:
            ap.error("cross needs --half")
        print(json.dumps(cross(args.half, args.floor, params, args.limit, args.checkpoint)))
    elif args.stage == "stack":
        print(json.dumps(stack(args.floor)))
    elif args.out is None:
        ap.error(f"{args.stage} needs --out")
    elif args.stage == "ship":
        print(json.dumps(ship(args.floor, args.out)))
    else:
        print(json.dumps(run_all(args.floor, args.epochs, args.stop_after, args.out)))


if __name__ == "__main__":
    main()
