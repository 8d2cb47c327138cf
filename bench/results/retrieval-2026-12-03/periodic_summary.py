"""Table of the periodic-trigger run (periodic_4k_512_*.jsonl: full, step-follow, periodic, periodic-follow on
all 30 probes; periodic8_4k_512_*.jsonl: full and periodic8-follow) beside the 2026-12-02 14:26 run's rows
of the same probes (accuracy_4k_512.jsonl: every step, the default, follow), with a check that the methods both runs decoded gave the same text (the decode is
deterministic, so the earlier run's rows can be paired with this run's). `--at2k`: the 2K run
(periodic_2k_512_*.jsonl: follow too) beside the 2026-11-22 run (every step, the default) and the 2026-12-02
2K follow run (follow_2k_512*.jsonl, for the text check).

    .venv/bin/python bench/results/retrieval-2026-12-03/periodic_summary.py [--at2k] [--plot PNG]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from retrieval.bench import draw, summarize

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
COLUMNS = (
    "method | correct | same answer as full | wins / losses vs full | wins / losses vs every step | "
    "(layer, step) rate | without the first step | steps with a retrieval | without the first step | "
    "MB fetched per probe | decode ms/token"
)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe(r: dict) -> tuple:
    return (r["task"], r["length"], r["depth"], r.get("seed", 0))


def same_text(new: list[dict], old: list[dict]) -> str:
    said = {(probe(r), r["method"]): r["text"] for r in old}
    same = [said[(probe(r), r["method"])] == r["text"] for r in new if (probe(r), r["method"]) in said]
    return f"{sum(same)}/{len(same)}"


def main() -> None:
    pattern, earlier_file, earlier, step_files, label = RUNS["2k" if "--at2k" in sys.argv else "4k"]
    rows = [r for f in sorted(HERE.glob(pattern)) for r in load(f)]
    # the periodic8 run decoded the full cache again: keep one row per (probe, method), after checking the texts
    # (the last file wins: periodic_ sorts after periodic8_, so the full rows are the main run's)
    kept = {(probe(r), r["method"]): r for r in rows}
    assert all(kept[(probe(r), r["method"])]["text"] == r["text"] for r in rows), "a rerun gave other text"
    new = list(kept.values())
    probes = {probe(r) for r in new}
    old = [r for r in load(earlier_file) if probe(r) in probes]
    steps = [r for f in step_files for r in load(f) if probe(r) in probes]
    print(
        f"{len(probes)} probes; texts equal to the {label}'s: {same_text(new, old)}; "
        f"to the step / follow run's: {same_text(new, steps)}"
    )
    rows = new + [r for r in old if r["method"] in earlier]
    for r in (r for r in rows if r["method"] != "full"):  # the earlier run did not record it: 15 decode
        r.setdefault(
            "step_retrieval_rate_after_first", (r.get("step_retrieval_rate", 0.0) * 15 - 1) / 14
        )  # steps, the first retrieving
    s = summarize(rows)
    if "--plot" in sys.argv:
        draw({"accuracy": s}, Path(sys.argv[sys.argv.index("--plot") + 1]))
    print("| " + COLUMNS + " |")
    print("|" + "---|" * len(COLUMNS.split("|")))
    for key in sorted(s, key=lambda k: (not k.startswith("full@"), k.startswith("every"), k)):
        v = s[key]
        name = key.split("@")[0]
        cells = [
            name + (f" ({label})" if name in earlier else ""),
            f"{v['correct']}/{v['probes']}",
            f"{v.get('same_text_as_full', '-')}/{v['probes']}" if name != "full" else "-",
            "-" if name == "full" else f"{v['wins_vs_full']} / {v['losses_vs_full']}",
            f"{v.get('wins_vs_every_step', 0)} / {v.get('losses_vs_every_step', 0)}"
            if "every" not in key
            else "-",
        ]
        if name == "full":
            cells += ["-"] * 5
        else:
            cells += [f"{v[k]:.3f}" for k in ("retrieval_rate", "retrieval_rate_after_first")]
            cells += [f"{v[k]:.3f}" for k in ("step_retrieval_rate", "step_retrieval_rate_after_first")]
            cells += [f"{v['mb_fetched']:.0f}"]
        cells += [f"{v['ms_per_token']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
