"""Probes for retrieval quality: passkey, needle in real passages, and a stream with facts at known blocks.

Prompts are ChatML token ids built piece by piece, so the planted text's token offset is known exactly.
Answers are numbers, scored by whether the generated text contains them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.chat import DEFAULT_SYSTEM, encode
from engine.paths import data_dir

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NAMES = (
    "blue door",
    "red lamp",
    "old bridge",
    "green kettle",
    "silver key",
    "tall tower",
    "quiet harbor",
    "paper kite",
)
# Stream facts use different wordings so that a question shares its distinctive words with one fact only.
FACTS = (
    ("The secret code of the {name} is {n}.", "What is the secret code of the {name}?"),
    ("Room {n} is where the {name} is kept.", "In which room is the {name} kept?"),
    ("Ticket number {n} was issued to the {name}.", "Which ticket number was issued to the {name}?"),
    ("The {name} weighs exactly {n} grams.", "How many grams does the {name} weigh?"),
    ("Captain Mora paid {n} coins for the {name}.", "How many coins did Captain Mora pay for the {name}?"),
    ("The {name} was found at mile marker {n}.", "At which mile marker was the {name} found?"),
    ("The password for the {name} vault is {n}.", "What is the password for the {name} vault?"),
    ("Exactly {n} pigeons live on the {name}.", "How many pigeons live on the {name}?"),
)


@dataclass
class Probe:
    """A prompt (`ids`), the answer to find in the output, and where the planted text sits."""

    ids: list[int]
    answer: str
    planted_at: int  # token index of the planted sentence in `ids`
    depth: float


@dataclass
class StreamFact:
    question: list[int]  # the question's ids (end of the user turn and the assistant header)
    focus: slice  # the rows of `question` holding its words (without the chat template's tokens)
    answer: str
    position: int  # stream position of the planted sentence


@dataclass
class FactStream:
    ids: list[int]
    facts: list[StreamFact]


def passages(limit: int = 150) -> list[str]:
    """Wikipedia passages of MuSiQue (../shared/data/rag/musique_s.json), in file order."""
    out = [c["text"].strip() for item in _musique()[:limit] for c in item["ctxs"]]
    # MuSiQue questions share Wikipedia paragraphs: keep each once, so a stream or haystack never repeats
    # the text around a planted fact elsewhere (a repeated paragraph is a decoy block for retrieval).
    return [p for p in dict.fromkeys(out) if p]


def qa_prompts(tokenizer: Any, n_tokens: int, items: slice) -> list[list[int]]:
    """ChatML prompts of MuSiQue questions over their own passages (as many as fit in `n_tokens`), for
    `items` of ../shared/data/rag/musique_s.json: short answers after a long context, for calibrating
    LouisKV's tau on the kind of decode the accuracy probes make (take items whose passages the probes
    do not use: `passages(limit=60)` draws from the first 60)."""
    from engine.chat import build_chat

    out = []
    for item in _musique()[items]:
        kept, used = [], 80
        for c in item["ctxs"]:
            size = len(encode(tokenizer, c["text"])) + 2
            if c["text"].strip() and used + size <= n_tokens:
                kept.append(c["text"])
                used += size
        out.append(build_chat(tokenizer, item["question"], kept).ids)
    return out


def passkey(tokenizer: Any, n_tokens: int, depth: float, seed: int = 0) -> Probe:
    """The classic passkey test: a key hidden at `depth` (0..1) in repeated filler."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return _probe(
        tokenizer, [FILLER] * (n_tokens // 20 + 2), needle, "What is the pass key?", key, n_tokens, depth
    )


def needle(tokenizer: Any, texts: Sequence[str], n_tokens: int, depth: float, seed: int = 0) -> Probe:
    """A sentence with a number hidden at `depth` in real passages (drawn from `texts` with `seed`)."""
    rng = random.Random(seed)
    name, number = rng.choice(NAMES), str(rng.randint(10000, 99999))
    order = list(texts)
    rng.shuffle(order)
    sentence = f"The secret code of the {name} is {number}. "
    question = f"What is the secret code of the {name}?"
    return _probe(tokenizer, [t + "\n\n" for t in order], sentence, question, number, n_tokens, depth)


def fact_stream(
    tokenizer: Any,
    texts: Sequence[str],
    n_tokens: int,
    blocks: Sequence[int],
    block_tokens: int,
    n_init: int,
    seed: int = 0,
) -> FactStream:
    """A stream of real passages (`n_tokens` long) with one fact planted inside each of `blocks`
    (ReKV block indices for `block_tokens` / `n_init`), and a question per fact."""
    if len(blocks) > len(FACTS):
        raise ValueError(f"at most {len(FACTS)} facts per stream, got {len(blocks)}")
    rng = random.Random(seed)
    names, templates = rng.sample(NAMES, len(blocks)), rng.sample(FACTS, len(blocks))
    ids = _prefix(tokenizer) + _body(tokenizer, [t + "\n\n" for t in texts], n_tokens)
    ids = ids[:n_tokens]
    facts = []
    for block, name, (statement, asked) in sorted(zip(blocks, names, templates, strict=True), reverse=True):
        number = str(rng.randint(10000, 99999))
        # Same casing as the question: lower-casing the fact (as the MuSiQue text is) turned "Captain
        # Mora" into other tokens than the question's, so the question no longer matched its fact.
        sentence = encode(tokenizer, " " + statement.format(name=name, n=number) + " ")
        at = n_init + block * block_tokens + 4
        if at + len(sentence) > min(len(ids), n_init + (block + 1) * block_tokens):
            raise ValueError(
                f"block {block} does not fit a {len(sentence)}-token fact in a {len(ids)}-token stream"
            )
        ids[at : at + len(sentence)] = sentence  # overwrite, so later blocks keep their offsets
        words = encode(tokenizer, f"\nQuestion: {asked.format(name=name)}")
        question = words + encode(tokenizer, "<|im_end|>\n<|im_start|>assistant\n")
        facts.append(StreamFact(question, slice(0, len(words)), number, at))
    return FactStream(ids, sorted(facts, key=lambda f: f.position))


def _probe(
    tokenizer: Any, pieces: list[str], planted: str, question: str, answer: str, n_tokens: int, depth: float
) -> Probe:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head, tail = (
        _prefix(tokenizer),
        encode(tokenizer, f"\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n"),
    )
    needle_ids = encode(tokenizer, planted)
    room = n_tokens - len(head) - len(tail) - len(needle_ids)
    if room < 1:
        raise ValueError(f"n_tokens {n_tokens} is too short for the probe")
    body = _body(tokenizer, pieces, room)[:room]
    at = int(round(depth * room))
    ids = head + body[:at] + needle_ids + body[at:] + tail
    return Probe(ids, answer, len(head) + at, depth)


def _musique() -> list[dict[str, Any]]:
    path = Path(data_dir()) / "rag" / "musique_s.json"
    if not path.is_file():
        raise ValueError(f"evaluation data {path} is absent (set KVFUSE_DATA)")
    return json.loads(path.read_text())


def _prefix(tokenizer: Any) -> list[int]:
    return encode(tokenizer, f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")


def _body(tokenizer: Any, pieces: Sequence[str], n_tokens: int) -> list[int]:
    out: list[int] = []
    for piece in pieces:
        if len(out) >= n_tokens:
            break
        out += encode(tokenizer, piece)
    if len(out) < n_tokens:
        raise ValueError(f"not enough text for {n_tokens} tokens (got {len(out)})")
    return out
