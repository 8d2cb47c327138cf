"""bench/blend.py's resumable bookkeeping: stable items, per-item lines merged across passes and files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_blend", REPO / "bench" / "blend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_item_is_the_same_whatever_the_run_size(bench, shared_data):
    few, more = bench.nq_items(3, 15), bench.nq_items(8, 15)
    assert [i["key"] for i in few] == [i["key"] for i in more[:3]]
    assert [i["passages"] for i in few] == [i["passages"] for i in more[:3]]
    for item in more:
        assert len(item["passages"]) == 15 == len(set(item["passages"]))


def test_lines_of_one_item_merge_and_a_pass_adds_methods(bench, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        json.dumps({"key": "nq-1", "dataset": "nq", "tokens": 9, "methods": {"full_prefill": {"gold_f1": 1}}})
        + "\n"
        + json.dumps({"key": "nq-1", "dataset": "nq", "tokens": 9, "methods": {"ape": {"gold_f1": 0.5}}})
        + "\n"
    )
    b.write_text(
        json.dumps({"key": "nq-2", "dataset": "nq", "tokens": 9, "methods": {"ape": {"gold_f1": 0}}})
    )
    merged = bench.load_results([a, b, tmp_path / "absent.jsonl"])
    assert set(merged) == {"nq-1", "nq-2"}
    assert set(merged["nq-1"]["methods"]) == {"full_prefill", "ape"}


def test_the_reference_round_trips(bench, tmp_path):
    path = bench.ref_path(tmp_path / "run.jsonl", "nq-7")
    assert path == tmp_path / "run_ref" / "nq-7.safetensors"
    logits = torch.randn(50)
    bench.save_ref(path, logits, [3, 1, 4])
    back, tokens = bench.load_ref(path)
    assert torch.equal(back, logits) and tokens == [3, 1, 4]
