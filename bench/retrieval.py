"""Retrieval benchmark: LouisKV and ReKV vs the full cache (prints one JSON line, draws a plot).

    .venv/bin/python bench/retrieval.py --quick          # 1K inputs, a few minutes
    .venv/bin/python bench/retrieval.py                  # 2K/4K inputs, budgets 256/512/1024, 256-token
                                                         # outputs, a 4K ReKV stream (long on 2 cores)

Same as `kvfuse retrieval bench`; see retrieval/bench.py for what is measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like the packages (bench/kvstore.py): keep them from shadowing the packages.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

from engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["retrieval", "bench", *sys.argv[1:]]))
