"""Table of the step-trigger run (step_4k_512*.jsonl) beside the 14:26 run's rows of the same probes
(accuracy_4k_512.jsonl), with a check that the methods both runs decoded (full, every-step-512) gave the
same text on every shared probe (the decode is deterministic, so the earlier run's other methods can be
paired with this run's). `--at2k`: the 2K follow run (follow_2k_512*.jsonl) beside the 2026-11-22 run.

    .venv/bin/python bench/results/retrieval-2026-12-02/step_summary.py [--at2k]
"""

from __future__ import annotations

import sys
from pathlib import Path

from retrieval.bench import (
    backfill_step_rate_after_first,
    load_rows,
    markdown_table,
    matching_texts,
    probe_key,
    summarize,
)

HERE = Path(__file__).resolve().parent
EARLIER = ("louiskv-512", "louiskv-answer-512", "louiskv-follow-512", "louiskv-anchor-follow-512")
EARLIER_2K = ("louiskv-512", "louiskv-answer-512", "every-step-512")


def main() -> None:
    at2k = "--at2k" in sys.argv[1:]
    earlier, pattern = (EARLIER_2K, "follow_2k_512*.jsonl") if at2k else (EARLIER, "step_4k_512*.jsonl")
    old_file = (
        HERE.parent / "retrieval-2026-11-22" / "accuracy.jsonl" if at2k else HERE / "accuracy_4k_512.jsonl"
    )
    new = [r for f in sorted(HERE.glob(pattern)) for r in load_rows(f)]
    probes = {probe_key(r) for r in new}
    old = [r for r in load_rows(old_file) if probe_key(r) in probes]
    print(
        f"{len(probes)} probes; texts of the methods in both runs equal to the earlier run's: "
        f"{matching_texts(new, old)}"
    )
    rows = new + [r for r in old if r["method"] in earlier]
    backfill_step_rate_after_first(rows, steps=15)  # the earlier run did not record it
    print("\n".join(markdown_table(summarize(rows), earlier, "earlier run")))


if __name__ == "__main__":
    main()
