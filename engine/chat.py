"""Chat prompts as token ids, cut at passage boundaries so each passage's KV can be cached on its own.

The pieces are tokenized separately (system+user header, each passage, question+assistant header), so
the concatenated ids are exactly what blend/ reassembles from cached segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SYSTEM = "You are a helpful assistant. Answer the question using the passages; be brief."


@dataclass
class ChatPrompt:
    prefix: list[int]  # system turn and the opening of the user turn: shared by every query
    passages: list[list[int]] = field(default_factory=list)
    question: list[int] = field(default_factory=list)  # question, end of user turn, assistant header

    @property
    def ids(self) -> list[int]:
        return [t for part in (self.prefix, *self.passages, self.question) for t in part]

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of the prefix, each passage, and the question, in `ids`."""
        out, start = [], 0
        for part in (self.prefix, *self.passages, self.question):
            out.append((start, start + len(part)))
            start += len(part)
        return out


def build_chat(
    tokenizer: Any,
    question: str,
    passages: Sequence[str] = (),
    system: str = DEFAULT_SYSTEM,
) -> ChatPrompt:
    """Token ids of a ChatML-style prompt: system, user turn of passages then the question, assistant header."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    start, end = _markers(tokenizer)
    prefix = f"{start}system\n{system}{end}\n{start}user\n"
    suffix = f"{'Question: ' if passages else ''}{question}{end}\n{start}assistant\n"
    return ChatPrompt(
        prefix=encode(tokenizer, prefix),
        passages=[encode(tokenizer, passage_text(p)) for p in passages],
        question=encode(tokenizer, suffix),
    )


def passage_text(passage: str) -> str:
    """How one passage appears in the prompt (its own paragraph)."""
    if not isinstance(passage, str) or not passage.strip():
        raise ValueError(f"a passage must be a non-empty string, got {passage!r}")
    return passage.strip() + "\n\n"


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _markers(tokenizer: Any) -> tuple[str, str]:
    """The turn markers of the model's chat template (ChatML for SmolLM2, Qwen2)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template:
        return "<|im_start|>", "<|im_end|>"
    raise ValueError(
        "the tokenizer's chat template is not ChatML (<|im_start|>); this helper supports ChatML only"
    )
