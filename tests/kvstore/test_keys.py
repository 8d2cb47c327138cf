"""Keys: deterministic across processes, separated by namespace, chained for prefixes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from kvstore_helpers import TINY

from kvstore import KVLayout, Namespace

SCRIPT = """
import json, sys, torch
from kvstore import KVLayout, Namespace
ns = Namespace("m", KVLayout(2, 2, 4, torch.float32, 4), salt="tenant-a")
print(json.dumps([ns.chunk_keys(list(range(10))), ns.segment_key([5, 6, 7])]))
"""


def test_same_key_in_two_processes_with_different_hash_seeds():
    outs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
        )
        outs.append(json.loads(run.stdout))
    assert outs[0] == outs[1]
    here = Namespace("m", KVLayout(2, 2, 4, torch.float32, 4), salt="tenant-a")
    assert outs[0] == [here.chunk_keys(list(range(10))), here.segment_key([5, 6, 7])]


def test_prefix_keys_are_chained():
    ns = Namespace("m", TINY)
    a = ns.chunk_keys([1, 2, 3, 4, 5, 6, 7, 8])
    b = ns.chunk_keys([9, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and a[0] != b[0]
    assert a[1] != b[1]  # same tokens in chunk 1, different history
    assert ns.chunk_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])[:2] == a  # a longer prompt shares the prefix keys


def test_partial_chunk_keys():
    ns = Namespace("m", TINY)
    assert len(ns.chunk_keys(list(range(10)))) == 3
    assert len(ns.chunk_keys(list(range(10)), partial=False)) == 2
    assert ns.chunk_keys([1, 2]) != ns.chunk_keys([1, 2, 3])


def test_namespace_separates_models_layouts_methods_and_tenants():
    tokens = list(range(8))
    variants = [
        Namespace("m", TINY),
        Namespace("other-model", TINY),
        Namespace("m", TINY, salt="tenant-b"),
        Namespace("m", KVLayout(2, 2, 4, torch.float16, 4)),
        Namespace("m", KVLayout(2, 2, 4, torch.float32, 8)),
        Namespace("m", TINY.with_method("think", keep=0.5)),
        Namespace("m", TINY.with_method("think", keep=0.25)),
    ]
    firsts = {ns.chunk_keys(tokens)[0] for ns in variants}
    segments = {ns.segment_key(tokens) for ns in variants}
    assert len(firsts) == len(variants) and len(segments) == len(variants)


def test_segment_key_is_position_free_and_differs_from_prefix_key():
    ns = Namespace("m", TINY)
    seg = ns.segment_key([7, 8, 9, 10])
    assert seg == ns.segment_key(np.array([7, 8, 9, 10], dtype=np.int64))
    assert seg == ns.segment_key(torch.tensor([7, 8, 9, 10]))
    assert seg != ns.chunk_keys([7, 8, 9, 10])[0]


def test_token_inputs_of_every_kind_agree():
    ns = Namespace("m", TINY)
    ref = ns.chunk_keys([3, 1, 4, 1, 5, 9])
    assert ns.chunk_keys(np.array([3, 1, 4, 1, 5, 9], dtype=np.int32)) == ref
    assert ns.chunk_keys(torch.tensor([3, 1, 4, 1, 5, 9])) == ref


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        ([1, -2], ValueError),
        ([1, 2**33], ValueError),
        ([1.5, 2.0], TypeError),
        (torch.tensor([1.0, 2.0]), TypeError),
        (np.zeros((2, 2), dtype=np.int64), ValueError),
        ("abc", TypeError),
    ],
)
def test_bad_token_ids_are_refused(tokens, error):
    with pytest.raises(error):
        Namespace("m", TINY).chunk_keys(tokens)


def test_bad_layouts_and_namespaces_are_refused():
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout(0, 2, 4)
    with pytest.raises(TypeError, match="dtype"):
        KVLayout(2, 2, 4, dtype="float16")
    with pytest.raises(ValueError, match="model_id"):
        Namespace("", TINY)
    with pytest.raises(ValueError, match="at least one token"):
        Namespace("m", TINY).segment_key([])
