"""The semantic cache's configuration (a dataclass; the server maps its settings onto it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.paths import data_dir, kvfuse_home
from semcache.categories import DEFAULT_CATEGORIES, Category
from semcache.embed import EmbedderConfig
from semcache.index import IndexParams
from semcache.limits import Limits
from semcache.load_policy import LoadPolicyConfig

AUTO = "auto"


def default_examples() -> Path | None:
    """The labelled domain questions in the shared evaluation data, where that folder exists."""
    path = data_dir() / "semcache" / "domain_questions_dev.json"
    return path if path.is_file() else None


@dataclass
class SemcacheConfig:
    redis_url: str | None = None  # None: documents in memory, mirrored to `folder` when that is set
    redis_prefix: str = "kvfuse:semcache:"
    # A PING sent before each index search so that an idle Redis is awake when the documents are
    # fetched (RedisStore.wake). Off: on the loaded shared machine it cut the fetch after a model pass
    # but added as much to misses (README, Semantic cache); a quiet-machine run decides.
    redis_wake: bool = False
    folder: str | None = AUTO  # index snapshots (and local documents); AUTO = $KVFUSE_HOME/semcache
    categories: tuple[Category, ...] = DEFAULT_CATEGORIES
    default_category: str = "default"
    classifier_examples: str | None = AUTO  # JSON [{category, question}]; AUTO = shared domain data
    min_category_score: float = 0.25  # below this centroid similarity a question goes to the default
    verify: bool = True
    verifier_path: str | None = None  # None = the weights shipped with the package
    verifier_cut: float | None = None  # None = the cut stored with the weights
    # Indexes held at once, one per (tenant, model, category): tenant names are free-form, so this is
    # the bound on the total. A one-entry scope costs ~8 KiB (index and ledger, measured); an insert
    # that would open one more is refused (stored: false, naming max_scopes); lookups of unknown
    # scopes miss.
    max_scopes: int | None = 10_000
    candidates: int = 4  # neighbours checked per lookup: the nearest may be expired or refused
    snapshot_interval_s: float = 300.0  # also saved on close; 0 = only on close
    sync_interval_s: float = 1.0  # how often a lookup first replays other processes' inserts/deletes
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexParams = field(default_factory=IndexParams)
    load: LoadPolicyConfig = field(default_factory=LoadPolicyConfig)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.max_scopes is not None and self.max_scopes < 1:
            raise ValueError(f"max_scopes must be >= 1 (or None: unbounded), got {self.max_scopes}")
        if not 1 <= self.candidates <= 64:
            raise ValueError(f"candidates must be in [1, 64], got {self.candidates}")
        if not 0.0 <= self.min_category_score <= 1.0:
            raise ValueError(f"min_category_score must be in [0, 1], got {self.min_category_score}")
        if self.verifier_cut is not None and not 0.0 <= self.verifier_cut <= 1.0:
            raise ValueError(f"verifier_cut must be in [0, 1], got {self.verifier_cut}")
        if self.sync_interval_s < 0:
            raise ValueError(f"sync_interval_s must be >= 0, got {self.sync_interval_s}")
        if self.snapshot_interval_s < 0:
            raise ValueError(f"snapshot_interval_s must be >= 0, got {self.snapshot_interval_s}")
        if not self.redis_prefix:
            raise ValueError("redis_prefix must not be empty (it keeps this cache's keys apart)")

    def folder_path(self) -> Path | None:
        if self.folder == AUTO:
            return kvfuse_home() / "semcache"
        return Path(self.folder) if self.folder else None

    def examples_path(self) -> Path | None:
        if self.classifier_examples == AUTO:
            return default_examples()
        return Path(self.classifier_examples) if self.classifier_examples else None
