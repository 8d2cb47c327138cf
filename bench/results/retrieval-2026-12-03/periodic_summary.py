"""Table of the periodic-trigger run (periodic_4k_512_*.jsonl: full, step-follow, periodic, periodic-follow on
all 30 probes; periodic8_4k_512_*.jsonl: full and periodic8-follow) beside the 2026-12-02 14:26 run's rows
of the same probes (accuracy_4k_512.jsonl: every step, the default, follow), with a check that the methods both runs decoded gave the same text (the decode is
deterministic, so the earlier run's rows can be paired with this run's). `--at2k`: the 2K run
(periodic_2k_512_*.jsonl: follow too) beside the 2026-11-22 run (every step, the default) and the 2026-12-02
2K follow run (follow_2k_512*.jsonl, for the text check).

    .venv/bin/python bench/results/retrieval-2026-12-03/periodic_summary.py [--at2k] [--plot PNG]
"""

from __future__ import annotations

import sys
from pathlib import Path

from retrieval.bench import (
    backfill_step_rate_after_first,
    draw,
    load_rows,
    markdown_table,
    matching_texts,
    probe_key,
    summarize,
)

HERE = Path(__file__).resolve().parent
DEC02 = HERE.parent / "retrieval-2026-12-02"
# per length: this run's files, the earlier run with every step, its methods paired in, the step run's files
# (text check only), the earlier run's label
RUNS = {
    "4k": (
        "periodic*_4k_512_*.jsonl",
        DEC02 / "accuracy_4k_512.jsonl",
        (
            "louiskv-512",
            "louiskv-follow-512",
            "louiskv-anchor-follow-512",
            "every-step-512",
            "every-step-follow-512",
        ),
        sorted(DEC02.glob("step_4k_512*.jsonl")),
        "2026-12-02 run",
    ),
    "2k": (
        "periodic_2k_512_*.jsonl",
        HERE.parent / "retrieval-2026-11-22" / "accuracy.jsonl",
        ("louiskv-512", "louiskv-answer-512", "every-step-512"),
        sorted(DEC02.glob("follow_2k_512*.jsonl")),
        "2026-11-22 run",
    ),
}


def main() -> None:
    pattern, earlier_file, earlier, step_files, label = RUNS["2k" if "--at2k" in sys.argv else "4k"]
    rows = [r for f in sorted(HERE.glob(pattern)) for r in load_rows(f)]
    # the periodic8 run decoded the full cache again: keep one row per (probe, method), after checking the texts
    # (the last file wins: periodic_ sorts after periodic8_, so the full rows are the main run's)
    kept = {(probe_key(r), r["method"]): r for r in rows}
    assert all(kept[(probe_key(r), r["method"])]["text"] == r["text"] for r in rows), (
        "a rerun gave other text"
    )
    new = list(kept.values())
    probes = {probe_key(r) for r in new}
    old = [r for r in load_rows(earlier_file) if probe_key(r) in probes]
    steps = [r for f in step_files for r in load_rows(f) if probe_key(r) in probes]
    print(
        f"{len(probes)} probes; texts equal to the {label}'s: {matching_texts(new, old)}; "
        f"to the step / follow run's: {matching_texts(new, steps)}"
    )
    rows = new + [r for r in old if r["method"] in earlier]
    backfill_step_rate_after_first(rows, steps=15)  # the earlier runs did not record it
    s = summarize(rows)
    if "--plot" in sys.argv:
        draw({"accuracy": s}, Path(sys.argv[sys.argv.index("--plot") + 1]))
    print("\n".join(markdown_table(s, earlier, label, digits=3)))


if __name__ == "__main__":
    main()
