"""Cutting documents into passages of about 256-512 tokens, at paragraph and sentence boundaries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class SplitConfig:
    """Passages aim at `target_tokens` and never exceed `max_tokens` (a longer sentence is cut by tokens)."""

    target_tokens: int = 384
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not 16 <= self.target_tokens <= self.max_tokens:
            raise ValueError(
                f"need 16 <= target_tokens <= max_tokens, got {self.target_tokens}, {self.max_tokens}"
            )


def split_document(tokenizer: Any, text: str, config: SplitConfig | None = None) -> list[str]:
    """The passages of `text`: whole paragraphs packed up to the target, long ones cut at sentences."""
    if not isinstance(text, str):
        raise TypeError(f"a document must be a str, got {type(text).__name__}")
    config = config or SplitConfig()
    pieces = [p for para in re.split(r"\n\s*\n", text) for p in _pieces(tokenizer, para.strip(), config)]
    return _pack(tokenizer, [p for p in pieces if p], config)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pieces(tokenizer: Any, para: str, config: SplitConfig) -> list[str]:
    """A paragraph as is when it fits, else its sentences (each cut by tokens if still too long)."""
    if not para or _count(tokenizer, para) <= config.target_tokens:
        return [para]
    out = []
    for sentence in _SENTENCE_END.split(para):
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), config.max_tokens):
            out.append(tokenizer.decode(ids[start : start + config.max_tokens]).strip())
    return out


def _pack(tokenizer: Any, pieces: list[str], config: SplitConfig) -> list[str]:
    """Greedy packing of consecutive pieces while the passage stays under the target."""
    passages: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        n = _count(tokenizer, piece)
        if current and size + n > config.target_tokens:
            passages.append(_join(current))
            current, size = [], 0
        current.append(piece)
        size += n
    if current:
        passages.append(_join(current))
    return passages


def _join(pieces: list[str]) -> str:
    # pieces of one paragraph are sentences: rejoin with a space; separate paragraphs with a blank line
    return "\n\n".join(pieces) if any("\n" in p for p in pieces) else " ".join(pieces)
