"""RoPE re-positioning: the rotation identity, and moved cached keys equal keys computed in place."""

from __future__ import annotations

import pytest
import torch

from blend.rope import RopeShift, check_rope_type


@pytest.fixture(scope="module")
def rope(engine):
    return RopeShift.for_engine(engine)


def test_rotation_identity_on_real_keys(engine, rope, prompt):
    """RoPE(RoPE(k, a), b) == RoPE(k, a + b), on layer-5 keys of a real prompt, with negative b too."""
    keys = engine.forward(prompt.ids[:64]).cache.layers[5].k[0]  # [heads, 64, dim], post-RoPE at 0..63
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3000, (64,), generator=gen)
    b = torch.randint(-2000, 2000, (64,), generator=gen)
    twice = rope.shift(rope.shift(keys, a), b)
    once = rope.shift(keys, a + b)
    scale = keys.abs().max().item()
    assert (twice - once).abs().max().item() < 1e-5 * max(scale, 1.0)
    back = rope.shift(rope.shift(keys, a), -a)
    assert (back - keys).abs().max().item() < 1e-5 * max(scale, 1.0)


def test_moved_keys_equal_keys_computed_at_the_new_positions(engine, rope, prompt):
    """A passage's keys cached at positions p..p+n moved by +40 equal a prefill with it 40 tokens later."""
    n = len(prompt.prefix) + len(prompt.passages[0])
    ids = prompt.ids[:n]
    here = engine.forward(ids).cache
    later = engine.forward(ids, positions=torch.arange(n) + 40).cache
    for layer in (0, 7, 29):
        moved = rope.shift(here.layers[layer].k, 40)
        # HF computes the angles in float32, and deeper layers add rounding from attention
        assert torch.allclose(moved, later.layers[layer].k, atol=2e-3, rtol=1e-3)
        # values carry no position: equal up to the float rounding of deeper layers' attention
        assert torch.allclose(here.layers[layer].v, later.layers[layer].v, atol=1e-3)
    assert torch.equal(here.layers[0].v, later.layers[0].v)


def test_shift_by_zero_is_identity_and_shapes_are_checked(rope):
    keys = torch.randn(3, 5, 64)
    assert rope.shift(keys, 0) is keys
    with pytest.raises(ValueError, match="delta"):
        rope.shift(keys, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="head_dim 32"):
        rope.shift(torch.randn(3, 5, 32), 1)


def test_plain_theta_matches_the_models_frequencies(engine, rope):
    plain = RopeShift.for_theta(engine.spec.rope_theta, engine.spec.head_dim)
    assert torch.allclose(plain.inv_freq, rope.inv_freq, rtol=1e-6)


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope"])
def test_rope_types_that_are_not_a_pure_rotation_are_refused_by_name(rope_type):
    with pytest.raises(ValueError, match=rope_type):
        check_rope_type(rope_type)
    check_rope_type("llama3")
    with pytest.raises(ValueError, match="attention factor 1.2"):
        check_rope_type("linear", 1.2)
