"""The benchmark's bookkeeping (no model): per-probe JSONL resume, stop time, paired counts."""

from __future__ import annotations

import json
import time

import pytest

from retrieval.bench import BenchConfig, _variants, accuracy, summarize


def _row(task, depth, seed, method, correct, **extra):
    return dict(
        task=task,
        length=1024,
        depth=depth,
        seed=seed,
        method=method,
        correct=correct,
        ms_per_token=1.0,
        **extra,
    )


def test_variants_share_the_middle_budget():
    variants = _variants(BenchConfig(budgets=(256, 512, 1024)))
    names = [name for name, _ in variants]
    assert names == [
        "louiskv-256",
        "louiskv-512",
        "louiskv-1024",
        "louiskv-answer-512",
        "louiskv-anchor-512",
        "louiskv-follow-512",
        "louiskv-anchor-follow-512",
        "louiskv-step-512",
        "louiskv-step-follow-512",
        "louiskv-periodic-512",
        "louiskv-periodic-follow-512",
        "louiskv-periodic8-follow-512",
        "every-step-512",
        "every-step-follow-512",
    ]
    assert [c.budget for _, c in variants] == [256, 512, 1024] + [512] * 11
    assert [c.trigger for _, c in variants[3:7]] == ["adjacent", "anchor", "adjacent", "anchor"]
    assert [c.follow for _, c in variants] == [0, 0, 0, 0, 0, 4, 4, 0, 4, 0, 4, 4, 0, 4]
    assert [c.scope for _, c in variants].count("step") == 2
    assert variants[7][1].scope == variants[8][1].scope == "step"
    assert [(c.trigger, c.period) for _, c in variants[9:12]] == [
        ("periodic", 4),
        ("periodic", 4),
        ("periodic", 8),
    ]


def test_methods_pick_variants_and_unknown_names_are_refused():
    cfg = BenchConfig(budgets=(512,), methods=("every-step-512", "louiskv-step-follow-512"))
    assert [name for name, _ in _variants(cfg)] == ["louiskv-step-follow-512", "every-step-512"]
    with pytest.raises(ValueError, match="louiskv-step-follow-256"):
        BenchConfig(budgets=(512,), methods=("louiskv-step-follow-256",))
    with pytest.raises(ValueError, match="tasks"):
        BenchConfig(tasks=("haystack",))


def test_done_probes_are_skipped_and_a_past_stop_time_starts_none(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [_row(t, 0.5, 0, m, True) for t in ("passkey", "needle") for m in ("full", "louiskv-256")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = BenchConfig(lengths=(1024,), depths=(0.5,), seeds=(0,), results=str(path))
    assert accuracy(None, cfg, []) == rows  # every probe is there: the model is never touched
    later = BenchConfig(
        lengths=(1024,), depths=(0.5,), seeds=(0, 1), results=str(path), stop_at=time.time() - 1
    )
    assert accuracy(None, later, []) == rows
    # Only the passkeys asked for: the needle (not done) is not run (the model would be needed).
    passkeys = rows[:2]
    path.write_text("".join(json.dumps(r) + "\n" for r in passkeys))
    only = BenchConfig(lengths=(1024,), depths=(0.5,), seeds=(0,), results=str(path), tasks=("passkey",))
    assert accuracy(None, only, []) == passkeys


def test_summary_counts_paired_wins_and_losses():
    rows = [
        _row("passkey", 0.1, 0, "full", True),
        _row("passkey", 0.1, 0, "louiskv-512", False, retrieval_rate=0.4, retrieval_rate_after_first=0.3),
        _row("passkey", 0.1, 0, "every-step-512", True, retrieval_rate=1.0, retrieval_rate_after_first=1.0),
        _row("needle", 0.1, 0, "full", False),
        _row("needle", 0.1, 0, "louiskv-512", True, retrieval_rate=0.2, retrieval_rate_after_first=0.1),
        _row("needle", 0.1, 0, "every-step-512", True, retrieval_rate=1.0, retrieval_rate_after_first=1.0),
        _row("passkey", 0.1, 0, "every-step-follow-512", False),
        _row("needle", 0.1, 0, "every-step-follow-512", False),
    ]
    for r, text in zip(rows, ["a", "b", "a", "c", "c", "d", "e", "f"], strict=True):
        r["text"] = text
    s = summarize(rows)
    assert (
        s["louiskv-512@1024"]["same_text_as_full"] == 1 and s["every-step-512@1024"]["same_text_as_full"] == 1
    )
    lk = s["louiskv-512@1024"]
    assert lk["correct"] == 1 and lk["probes"] == 2 and abs(lk["retrieval_rate"] - 0.3) < 1e-9
    assert abs(lk["retrieval_rate_after_first"] - 0.2) < 1e-9
    assert (lk["wins_vs_full"], lk["losses_vs_full"]) == (1, 1)
    assert (lk["wins_vs_every_step"], lk["losses_vs_every_step"]) == (0, 1)
    assert (lk["wins_vs_every_step_follow"], lk["losses_vs_every_step_follow"]) == (1, 0)
    assert "wins_vs_every_step_follow" not in s["every-step-follow-512@1024"]
    assert (s["every-step-512@1024"]["wins_vs_full"], s["every-step-512@1024"]["losses_vs_full"]) == (1, 0)
