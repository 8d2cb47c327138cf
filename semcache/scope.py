"""The hard isolation unit: one index and one quota per (tenant, model, category).

A search runs inside exactly one scope's index, so an entry of another tenant or model can never be a
candidate, however similar its question (a namespace prefixed to the text is not isolation: the
paper's authors saw it leak at similarity 0.91).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

MAX_ID_CHARS = 128
_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")


def check_id(kind: str, value: object) -> str:
    """Tenant and model ids: short printable tokens, no spaces (they name keys and folders)."""
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a str, got {type(value).__name__}")
    if not _ID.match(value):
        raise ValueError(
            f"{kind} must be 1-{MAX_ID_CHARS} characters of letters, digits or ._:@/+=-, got {value!r:.80}"
        )
    return value


@dataclass(frozen=True)
class Scope:
    tenant: str
    model: str
    category: str

    def digest(self) -> str:
        """Stable folder name (never Python's hash(), which changes per process)."""
        raw = json.dumps([self.tenant, self.model, self.category]).encode()
        return hashlib.blake2b(raw, digest_size=12).hexdigest()

    def to_dict(self) -> dict:
        return {"tenant": self.tenant, "model": self.model, "category": self.category}
