"""Table of the step-trigger run (step_4k_512*.jsonl) beside the 14:26 run's rows of the same probes
(accuracy_4k_512.jsonl), with a check that the methods both runs decoded (full, every-step-512) gave the
same text on every shared probe (the decode is deterministic, so the earlier run's other methods can be
paired with this run's). `--at2k`: the 2K follow run (follow_2k_512*.jsonl) beside the 2026-11-22 run.

    .venv/bin/python bench/results/retrieval-2026-12-02/step_summary.py [--at2k]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from retrieval.bench import summarize

HERE = Path(__file__).resolve().parent
EARLIER = ("louiskv-512", "louiskv-answer-512", "louiskv-follow-512", "louiskv-anchor-follow-512")
EARLIER_2K = ("louiskv-512", "louiskv-answer-512", "every-step-512")
COLUMNS = (
    "method | correct | same answer as full | wins / losses vs full | wins / losses vs every step | "
    "(layer, step) rate | without the first step | steps with a retrieval | without the first step | "
    "MB fetched per probe | decode ms/token"
)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe(r: dict) -> tuple:
    return (r["task"], r["length"], r["depth"], r.get("seed", 0))


def main() -> None:
    at2k = "--at2k" in sys.argv[1:]
    earlier, pattern = (EARLIER_2K, "follow_2k_512*.jsonl") if at2k else (EARLIER, "step_4k_512*.jsonl")
    old_file = (
        HERE.parent / "retrieval-2026-11-22" / "accuracy.jsonl" if at2k else HERE / "accuracy_4k_512.jsonl"
    )
    new = [r for f in sorted(HERE.glob(pattern)) for r in load(f)]
    probes = {probe(r) for r in new}
    old = [r for r in load(old_file) if probe(r) in probes]
    said = {(probe(r), r["method"]): r["text"] for r in old}
    same = [said[(probe(r), r["method"])] == r["text"] for r in new if (probe(r), r["method"]) in said]
    print(
        f"{len(probes)} probes; texts of the methods in both runs equal to the earlier run's: {sum(same)}/{len(same)}"
    )
    rows = new + [r for r in old if r["method"] in earlier]
    for r in rows:  # the earlier run did not record it: 15 decode steps, the first always retrieving
        r.setdefault("step_retrieval_rate_after_first", (r.get("step_retrieval_rate", 0.0) * 15 - 1) / 14)
    s = summarize(rows)
    print("| " + COLUMNS + " |")
    print("|" + "---|" * len(COLUMNS.split("|")))
    for key in sorted(s, key=lambda k: (not k.startswith("full@"), k.startswith("every"), k)):
        v = s[key]
        cells = [
            key.split("@")[0] + (" (earlier run)" if key.split("@")[0] in earlier else ""),
            f"{v['correct']}/{v['probes']}",
            f"{v.get('same_text_as_full', '-')}/{v['probes']}" if not key.startswith("full@") else "-",
            "-" if key.startswith("full@") else f"{v['wins_vs_full']} / {v['losses_vs_full']}",
            f"{v.get('wins_vs_every_step', 0)} / {v.get('losses_vs_every_step', 0)}"
            if "every" not in key
            else "-",
        ]
        if key.startswith("full@"):
            cells += ["-"] * 5
        else:
            cells += [f"{v[k]:.2f}" for k in ("retrieval_rate", "retrieval_rate_after_first")]
            cells += [f"{v[k]:.2f}" for k in ("step_retrieval_rate", "step_retrieval_rate_after_first")]
            cells += [f"{v['mb_fetched']:.0f}"]
        cells += [f"{v['ms_per_token']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
