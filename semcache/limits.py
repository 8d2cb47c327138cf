"""Input limits and checks: every bad value gets a ValueError/TypeError that names it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


@dataclass
class Limits:
    # The embedder reads 256 tokens (~1,000-1,500 characters of English); a longer question would
    # match on its prefix alone, so it is refused rather than silently truncated.
    max_question_chars: int = 2048
    max_answer_bytes: int = 256 * 1024
    max_metadata_bytes: int = 8 * 1024
    max_ttl_s: float = 90 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("max_question_chars", "max_answer_bytes", "max_metadata_bytes", "max_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def question(self, value: object, name: str = "question") -> str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{name} is empty")
        if len(value) > self.max_question_chars:
            raise ValueError(f"{name} has {len(value)} characters; the limit is {self.max_question_chars}")
        return value

    def answer(self, value: object) -> str:
        if not isinstance(value, str):
            raise TypeError(f"answer must be a str, got {type(value).__name__}")
        if not value:
            raise ValueError("answer is empty")
        size = len(value.encode())
        if size > self.max_answer_bytes:
            raise ValueError(f"answer has {size} bytes; the limit is {self.max_answer_bytes}")
        return value

    def metadata(self, value: object) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TypeError(f"metadata must be a dict with str keys, got {type(value).__name__}")
        try:
            size = len(json.dumps(value, allow_nan=False).encode())
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be plain JSON (str, numbers, lists, dicts): {exc}") from exc
        if size > self.max_metadata_bytes:
            raise ValueError(f"metadata has {size} bytes as JSON; the limit is {self.max_metadata_bytes}")
        return value

    def ttl(self, value: object) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"ttl_s must be a number of seconds, got {type(value).__name__}")
        if not (math.isfinite(value) and 0 < value <= self.max_ttl_s):
            raise ValueError(f"ttl_s must be in (0, {self.max_ttl_s}], got {value}")
        return float(value)
