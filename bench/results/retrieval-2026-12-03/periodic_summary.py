"""Table of the periodic-trigger run (periodic_4k_512_*.jsonl: full, step-follow, periodic, periodic-follow on
all 30 probes) beside the 2026-12-02 14:26 run's rows of the same probes (accuracy_4k_512.jsonl: every step,
the default, follow), with a check that the methods both runs decoded gave the same text (the decode is
deterministic, so the earlier run's rows can be paired with this run's).

    .venv/bin/python bench/results/retrieval-2026-12-03/periodic_summary.py [--plot docs/retrieval-2026-12-03.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from retrieval.bench import draw, summarize

HERE = Path(__file__).resolve().parent
EARLIER_FILE = HERE.parent / "retrieval-2026-12-02" / "accuracy_4k_512.jsonl"
STEP_FILES = sorted((HERE.parent / "retrieval-2026-12-02").glob("step_4k_512*.jsonl"))
EARLIER = (
    "louiskv-512",
    "louiskv-follow-512",
    "louiskv-anchor-follow-512",
    "every-step-512",
    "every-step-follow-512",
)
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
    new = [r for f in sorted(HERE.glob("periodic_4k_512_*.jsonl")) for r in load(f)]
    probes = {probe(r) for r in new}
    old = [r for r in load(EARLIER_FILE) if probe(r) in probes]
    steps = [r for f in STEP_FILES for r in load(f) if probe(r) in probes]
    print(
        f"{len(probes)} probes; texts equal to the 14:26 run's: {same_text(new, old)}; "
        f"to the step run's: {same_text(new, steps)}"
    )
    rows = new + [r for r in old if r["method"] in EARLIER]
    for r in rows:  # the earlier run did not record it: 15 decode steps, the first always retrieving
        r.setdefault("step_retrieval_rate_after_first", (r.get("step_retrieval_rate", 0.0) * 15 - 1) / 14)
    s = summarize(rows)
    if "--plot" in sys.argv:
        draw({"accuracy": s}, Path(sys.argv[sys.argv.index("--plot") + 1]))
    print("| " + COLUMNS + " |")
    print("|" + "---|" * len(COLUMNS.split("|")))
    for key in sorted(s, key=lambda k: (not k.startswith("full@"), k.startswith("every"), k)):
        v = s[key]
        name = key.split("@")[0]
        cells = [
            name + (" (2026-12-02 run)" if name in EARLIER else ""),
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
