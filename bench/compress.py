"""Compression benchmark (ThinK, Chelsea, eviction baselines) against the full cache; one JSON line.

    .venv/bin/python bench/compress.py --quick                 # ~2 min
    .venv/bin/python bench/compress.py --lengths 1024 2048     # what the README reports
    .venv/bin/python bench/compress.py                         # full size: 1K/2K/4K, 256 steps, 5x5 passkey

Same as `kvfuse compress bench`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress.bench import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
