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


def test_gold_scores_read_the_first_line_as_the_answer_and_keep_the_whole_output(bench):
    text = "Paris\n\nThe Eiffel Tower is in Paris, the capital of France, on the Seine."
    s = bench.gold_scores(text, ["Paris"])
    assert bench.first_line(text) == "Paris" and bench.first_line("\nParis\nmore") == "Paris"
    assert s["gold_f1_line"] == 1.0 and s["gold_em_line"] == 1.0 and s["gold_hit_line"] == 1.0
    assert 0.0 < s["gold_f1"] < 0.2 and s["gold_em"] == 0.0 and s["gold_hit"] == 1.0
    # an answer only after the first newline does not count for the first-line measures
    late = bench.gold_scores("I am not sure.\nParis", ["the Paris"])
    assert late["gold_hit_line"] == 0.0 and late["gold_f1_line"] == 0.0 and late["gold_hit"] == 1.0


def test_the_report_rescores_stored_texts_with_the_answers_of_the_data(bench, shared_data):
    item = bench.nq_items(1, 15)[0]
    answer = item["answers"][0]
    results = [
        {
            "key": item["key"],
            "methods": {
                "full_prefill": {"text": f"{answer}\nmore", "gold_f1": 0.0},
                "ape": {"text": "no idea"},
            },
        }
    ]
    bench.rescore(results)
    full, ape = results[0]["methods"]["full_prefill"], results[0]["methods"]["ape"]
    assert full["gold_f1_line"] == 1.0 and full["gold_f1"] > 0.0  # the stale stored score is replaced
    assert ape["gold_f1_line"] == 0.0 and ape["gold_hit"] == 0.0
    with pytest.raises(ValueError, match="nqx-3"):
        bench.gold_answers(["nqx-3"])


def test_paired_gap_and_ratio_to_full_prefill(bench):
    rows = [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)]
    results = [{"methods": {"full_prefill": {"x": f}, "m": {"x": m}}} for m, f in rows]
    out = bench.paired(results, "m", "x")
    assert out["x_minus_full"] == 0.0 and out["x_ratio"] == 1.0
    # diffs 0, -1, 1, 0: stdev sqrt(2/3), over sqrt(4)
    assert out["x_minus_full_se"] == round((2 / 3) ** 0.5 / 2, 4)
    # var(a) = var(b) = 1/3, cov(a, b) = 0, mean(b) = 1/2: sqrt(2/3) / (1/2 * 2)
    assert out["x_ratio_se"] == round((2 / 3) ** 0.5, 3)


def test_the_probe_swapped_ape_is_parallel_encoding_at_t_s_one_and_tempers_the_other_part(bench):
    spec = importlib.util.spec_from_file_location("ape_probe", REPO / "bench" / "blend_ape_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    from blend.ape import APEAttention, APEConfig
    from engine.attention import AttnCall

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 3, 8, generator=g), *torch.randn(2, 1, 2, 12, 8, generator=g))
    call = AttnCall(0, q, k, v, torch.arange(9, 12), torch.arange(5, 8), 8**-0.5)
    plain = APEAttention(2, 9, APEConfig(1.0, 1.0))(call)
    assert torch.allclose(probe.SwappedAPE(2, 9, APEConfig(1.0, 1.0))(call), plain, atol=1e-6)
    ape, swapped = (
        APEAttention(2, 9, APEConfig(0.9, 0.9))(call),
        probe.SwappedAPE(2, 9, APEConfig(0.9, 0.9))(call),
    )
    assert (ape - plain).abs().max() > 1e-3 and (swapped - plain).abs().max() > 1e-3
    assert (ape - swapped).abs().max() > 1e-3


def test_pending_reads_the_files_afresh_so_two_processes_stop_where_they_meet(bench, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    methods = ["full_prefill", "ape"]
    assert bench.pending("nq-3", methods, [a, b]) == methods  # neither file exists yet
    a.write_text(json.dumps({"key": "nq-3", "dataset": "nq", "tokens": 9, "methods": {"ape": {}}}) + "\n")
    assert bench.pending("nq-3", methods, [a, b]) == ["full_prefill"]
    b.write_text(json.dumps({"key": "nq-3", "dataset": "nq", "tokens": 9, "methods": {"full_prefill": {}}}))
    assert bench.pending("nq-3", methods, [a, b]) == []
    assert bench.pending("nq-4", methods, [a, b]) == methods
