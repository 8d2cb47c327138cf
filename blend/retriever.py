"""BM25 over the ingested passages: picks the top-k passages for a question when none are given.

Lexical, dependency-free and deterministic; good enough for Wikipedia-style QA. Swap it for a dense
retriever by giving the pipeline any object with `add(ids, texts)` and `search(question, k)`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "has",
        "he",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "to",
        "was",
        "were",
        "will",
        "with",
        "what",
        "who",
        "when",
        "where",
        "which",
        "how",
        "why",
        "did",
        "do",
        "does",
    ]
)


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


@dataclass
class BM25:
    k1: float = 1.2
    b: float = 0.75
    ids: list[str] = field(default_factory=list)
    _tf: list[Counter] = field(default_factory=list, repr=False)
    _df: Counter = field(default_factory=Counter, repr=False)
    _length: int = 0

    def add(self, ids: list[str], texts: list[str]) -> None:
        known = set(self.ids)
        for pid, text in zip(ids, texts, strict=True):
            if pid in known:
                continue
            known.add(pid)
            tf = Counter(terms(text))
            self.ids.append(pid)
            self._tf.append(tf)
            self._df.update(tf.keys())
            self._length += sum(tf.values())

    def search(self, question: str, k: int) -> list[tuple[str, float]]:
        """The `k` best (passage id, score) pairs, best first; passages sharing no term are left out."""
        if not self.ids:
            return []
        n, avg = len(self.ids), self._length / len(self.ids) or 1.0
        query = set(terms(question))
        scores = []
        for pid, tf in zip(self.ids, self._tf, strict=True):
            length = sum(tf.values())
            s = 0.0
            for t in query:
                f = tf.get(t, 0)
                if f:
                    idf = math.log(1 + (n - self._df[t] + 0.5) / (self._df[t] + 0.5))
                    s += idf * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * length / avg))
            if s > 0:
                scores.append((pid, s))
        scores.sort(key=lambda x: -x[1])
        return scores[:k]
