"""The pair-model verifier: MiniLM reading both questions, a few steps of fine-tuning, weights round trip."""

from __future__ import annotations

import numpy as np
import pytest

from semcache.pair_features import FEATURES, IdfTable
from semcache.verify import Verifier

PAIRS = [
    ("How do I sort a list ascending in Python?", "How can I sort a Python list in ascending order?", 1),
    ("How do I sort a list ascending in Python?", "How do I reverse a string in Java?", 0),
    ("What is the capital of France?", "Which city is the capital of France?", 1),
    ("What is the capital of France?", "What is the population of France?", 0),
]


@pytest.fixture(scope="module")
def pair_model():
    from semcache.pair_model import PairModel

    return PairModel()


def test_pair_model_learns_a_few_pairs_and_its_tensors_round_trip(pair_model, tmp_path):
    from semcache.fit_pair import half_of
    from semcache.pair_model import FROZEN, PREFIX, PairModel, PairTrainParams, train_pair_model

    cached, queries, y = [a for a, _, _ in PAIRS], [b for _, b, _ in PAIRS], np.array([p[2] for p in PAIRS])
    losses: list[float] = []
    params = PairTrainParams(epochs=8, stop_after=6, batch_size=4, lr=1e-4, warmup=0.0)
    train_pair_model(
        pair_model, cached, queries, y, params, lambda e, loss: losses.append(loss), log=lambda s: None
    )
    assert len(losses) == 6 and losses[-1] < losses[0]  # full fine-tuning moves the loss on four pairs
    logits = pair_model.logits(cached, queries)
    assert logits.shape == (4,) and np.isfinite(logits).all()

    tensors = pair_model.trained_tensors()
    assert all(k.startswith(PREFIX) for k in tensors) and not any(FROZEN in k for k in tensors)
    assert sum(v.nbytes for v in tensors.values()) < 25e6  # small enough to commit
    net = _net(len(FEATURES) + 1)
    verifier = Verifier([net], IdfTable({}, 5.0), cut=0.4, pair=pair_model)
    verifier.save(tmp_path / "v.safetensors")
    back = Verifier.load(tmp_path / "v.safetensors")
    assert back.pair is not None
    np.testing.assert_allclose(back.pair.logits(cached, queries), logits, atol=0.05)  # float16 on disk
    u = np.eye(384, dtype=np.float32)[:4]
    assert back.p_same_many(queries, cached, u, u).shape == (4,)

    with pytest.raises(ValueError, match="features"):
        Verifier([_net(len(FEATURES))], IdfTable({}, 5.0), pair=pair_model)  # no input for the logit
    with pytest.raises(ValueError, match="incomplete"):
        PairModel.load_trained(pair_model, {f"{PREFIX}head.weight": tensors[f"{PREFIX}head.weight"]})
    with pytest.raises(ValueError, match="stop_after"):
        PairTrainParams(epochs=2, stop_after=3)
    with pytest.raises(ValueError, match="one label per pair"):
        train_pair_model(pair_model, cached, queries[:2], y)
    halves = half_of([{"text_a": a, "text_b": b} for a, b, _ in PAIRS])
    assert halves[0] == halves[1] and halves[2] == halves[3]  # a shared question keeps pairs together


def _net(n: int):
    from semcache.mlp import Mlp

    rng = np.random.default_rng(0)
    f32 = np.float32
    return Mlp(np.zeros(n, f32), np.ones(n, f32), 0.01 * rng.normal(size=(n, 4)).astype(f32), np.zeros(4, f32),
               rng.normal(size=4).astype(f32), 0.0)  # fmt: skip
