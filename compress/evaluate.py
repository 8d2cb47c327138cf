"""Quality of a compressed cache against the same model's full cache: teacher forcing and passkey.

Both follow the store's use: a context is prefilled and compressed on its own (its observation window is
its own last tokens, no question in sight), then a continuation or a question runs over it.
- Teacher forcing: the true continuation is fed over the compressed cache; each position's next-token
  distribution is compared with the full cache's (KL(full || compressed), top-1 agreement) and scored
  on the true next token (perplexity). Single-token greedy steps afterwards give decode ms per token.
- Passkey: "The pass key is NNNNN. Remember it. NNNNN is the pass key." hidden at a depth of real text;
  the question follows the compressed context; greedy decoding must produce the key.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.runtime import attend
from engine.kvcache import KVCache
from engine.runner import Engine

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def musique_text(data: Path, item: int) -> str:
    """The passages of one MuSiQue item (about 5-6K tokens), as "title: text" paragraphs."""
    rows = json.loads((data / "rag" / "musique_s.json").read_text())
    ctxs = rows[item % len(rows)]["ctxs"]
    return "\n\n".join(f"{c['title'].strip()}: {c['text'].strip()}" for c in ctxs)


def nq_passages(data: Path, count: int, seed: int) -> list[str]:
    """`count` gold Wikipedia passages of NQ-open, drawn with `seed` (filler for passkey haystacks)."""
    with gzip.open(data / "rag" / "nq-open-oracle.jsonl.gz", "rt") as f:
        passages = [json.loads(line)["ctxs"][0]["text"].strip() for line in f]
    random.Random(seed).shuffle(passages)
    return passages[:count]


def tokens_of(engine: Engine, text: str) -> list[int]:
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Forced:
    """Per-step log-probabilities `[steps, vocab]`, the true next tokens, and single-step decode times."""

    logprobs: torch.Tensor
    targets: torch.Tensor
    step_ms: list[float]


@torch.inference_mode()
def teacher_force(
    engine: Engine, cache: KVCache, continuation: list[int], block: int = 32, timed: int = 8
) -> Forced:
    """Feed `continuation[:-1]` over `cache` (mutated) `block` rows per forward; predict each next token.

    Rows of one block attend causally to each other, exactly as one-token steps would; a merging method
    (Chelsea) merges the chunks that left its window at each block start instead of at each token.
    Then `timed` single-token greedy steps measure decode time at that context length.
    """
    fed = continuation[:-1]
    out = []
    for start in range(0, len(fed), block):
        logits = engine.forward(fed[start : start + block], cache=cache, attention=attend, logits="all")
        out.append(torch.log_softmax(logits.logits[0].float(), dim=-1))
    logprobs = torch.cat(out)
    token, times = int(logprobs[-1].argmax()), []
    for _ in range(timed):
        begin = time.perf_counter()
        token = int(engine.forward([token], cache=cache, attention=attend).logits[0, -1].argmax())
        times.append((time.perf_counter() - begin) * 1000)
    return Forced(logprobs, torch.tensor(continuation[1:]), times)


def agreement(full: Forced, other: Forced) -> dict[str, float]:
    """KL(full || other) and top-1 agreement per step, and both continuation perplexities."""
    kl = (full.logprobs.exp() * (full.logprobs - other.logprobs)).sum(-1)
    top1 = (full.logprobs.argmax(-1) == other.logprobs.argmax(-1)).float()
    return {
        "kl": float(kl.mean()),
        "top1": float(top1.mean()),
        "ppl": perplexity(other),
        "ppl_delta": perplexity(other) - perplexity(full),
        "decode_ms": float(torch.tensor(other.step_ms).median()),
    }


def perplexity(forced: Forced) -> float:
    nll = -forced.logprobs.gather(1, forced.targets[:, None]).mean()
    return math.exp(float(nll))


@dataclass
class PasskeyTrial:
    context: list[int]  # filler with the needle, ends at a passage boundary
    question: list[int]
    key: str
    depth: float


def passkey_trials(
    engine: Engine, filler: list[str], tokens: int, depths: list[float], keys: int, seed: int
) -> list[PasskeyTrial]:
    """depths x keys haystacks of about `tokens` tokens (context + question) from `filler` paragraphs."""
    rng = random.Random(seed)
    question = tokens_of(engine, QUESTION)
    paragraphs = [tokens_of(engine, p.strip() + "\n\n") for p in filler]
    trials = []
    for depth in depths:
        for _ in range(keys):
            key = str(rng.randint(10000, 99999))
            needle = tokens_of(engine, NEEDLE.format(key=key))
            body = _fill(paragraphs, tokens - len(needle) - len(question))
            cut = _boundary(body, depth)
            context = [t for p in body[:cut] for t in p] + needle + [t for p in body[cut:] for t in p]
            trials.append(PasskeyTrial(context, question, key, depth))
    return trials


def _fill(paragraphs: list[list[int]], budget: int) -> list[list[int]]:
    body, used = [], 0
    for p in paragraphs:
        if used + len(p) > budget:
            body.append(p[: budget - used])
            break
        body.append(p)
        used += len(p)
    else:
        raise ValueError(f"the filler text has only {used} tokens, {budget} are needed")
    return body


def _boundary(body: list[list[int]], depth: float) -> int:
    """The paragraph boundary closest to `depth` of the body's tokens."""
    ends = [0]
    for p in body:
        ends.append(ends[-1] + len(p))
    goal = depth * ends[-1]
    return min(range(len(ends)), key=lambda i: abs(ends[i] - goal))


@torch.inference_mode()
def answer(engine: Engine, cache: KVCache, question: list[int], max_new_tokens: int = 8) -> str:
    """Greedy answer to `question` asked after the (compressed) `cache`."""
    out = engine.forward(question, cache=cache, attention=attend)
    new, _ = engine.decode(out.logits[0, -1], cache, max_new_tokens, attention=attend)
    return engine.tokenizer.decode(new)


def found(text: str, key: str) -> bool:
    """Whether the first number in the answer is the key."""
    digits = re.findall(r"\d+", text)
    return bool(digits) and digits[0] == key
