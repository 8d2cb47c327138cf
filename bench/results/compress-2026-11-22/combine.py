"""Redraw docs/compress_quality.png: the earlier run's rows (README table, compress/ as of 6347cf3)
with this run's rows (the JSON files beside this script) replacing the settings it re-ran.

    .venv/bin/python bench/results/compress-2026-11-22/combine.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from compress.bench import plot, settings  # noqa: E402

LENGTHS = (1024, 2048, 4096)
RUNS = ["1k.json", "2k5.json", "4k.json"]  # this run's question-in-prompt runs (25 passkey trials each)


def earlier_rows() -> list[dict]:
    """The first table of the README's Compression section: KV, top-1 and passkey at 1K/2K/4K."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Compression") :]
    family = {s.name: s.family for s in settings()}
    rows = []
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \|", line)
        if not m or m.group(1) not in family:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        if len(cells) != 9 or not re.match(r"[\d.]+", cells[0]) or "." not in cells[6]:
            continue  # the second table (KL, ppl, ms) has signed and integer cells
        for i, n in enumerate(LENGTHS):
            kv, top1, key = cells[i], cells[3 + i], cells[6 + i]
            if kv == "-":
                continue
            rows.append(
                {
                    "length": n,
                    "setting": m.group(1),
                    "family": family[m.group(1)],
                    "kv_ratio": float(kv),
                    "top1": float(top1),
                    "passkey": None if key == "-" else float(key),
                }
            )
    return rows


def main() -> None:
    new = [r for f in RUNS if (HERE / f).exists() for r in json.loads((HERE / f).read_text())["results"]]
    rerun = {(r["length"], r["setting"]) for r in new}
    rows = [r for r in earlier_rows() if (r["length"], r["setting"]) not in rerun] + new
    report = {"results": rows, "sources": ["README table (earlier run)", *RUNS]}
    (HERE / "combined.json").write_text(json.dumps(report))
    plot(report, ROOT / "docs" / "compress_quality.png")


if __name__ == "__main__":
    main()
