"""Keep the garbage collector's full passes off the request path.

After its imports (torch, FastAPI, pydantic, uvicorn) a server process holds ~400K objects that live as
long as it does, more once a model loads for the RAG or semantic-cache routes. A full (generation 2)
collection walks every one of them: 0.3 s measured on this machine, during which no request is served.
`freeze_heap()` moves them to the permanent generation, which collections skip (`gc.freeze`); objects
made afterwards are collected as usual. It runs once the store is open and after each lazy model load.
"""

from __future__ import annotations

import gc
from typing import Any


def freeze_heap() -> None:
    gc.collect()  # startup's garbage is freed, not frozen
    gc.freeze()


def heap_stats() -> dict[str, Any]:
    """Objects frozen, and per generation: collections so far and objects collected."""
    generations = gc.get_stats()
    return {
        "frozen_objects": gc.get_freeze_count(),
        "collections": [g["collections"] for g in generations],
        "collected": [g["collected"] for g in generations],
    }
