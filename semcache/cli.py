"""`kvfuse semcache ...`: use the semantic cache locally (Redis or folder) or through a server (`--url`).

Every command prints one JSON document. Local mode reads the same `KVFUSE_SEMCACHE_*` settings as the
server, so the CLI and a server share entries when they point at the same Redis.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a kvfuse server (e.g. http://127.0.0.1:8000); default: local cache")
    p.add_argument("--api-key", help="API key for --url (default: $KVFUSE_API_KEY)")
    p.add_argument("--redis", help="local mode: Redis URL (default: $KVFUSE_SEMCACHE_REDIS_URL or none)")
    p.add_argument("--prefix", help="local mode: Redis key prefix")
    p.add_argument("--folder", help="local mode: folder for index snapshots and local documents")
    p.add_argument("--no-verify", action="store_true", help="local mode: switch off the verification stage")


def _add_scope(p: argparse.ArgumentParser, tenant_required: bool = True) -> None:
    p.add_argument("--tenant", required=tenant_required, help="tenant id (entries never cross tenants)")
    p.add_argument("--category", help="category name (default: classified from the question)")
    p.add_argument("--model", default=None, help="downstream model id (default: 'default')")


def register(subparsers: argparse._SubParsersAction) -> None:
    sc = subparsers.add_parser("semcache", help="category-aware semantic cache")
    sub = sc.add_subparsers(dest="semcache_command", required=True)
    p = sub.add_parser("lookup", help="cached answer for a question (or a paraphrase)")
    p.add_argument("question")
    _add_scope(p)
    p = sub.add_parser("insert", help="store an answer")
    p.add_argument("question")
    p.add_argument("answer")
    _add_scope(p)
    p.add_argument("--ttl", type=float, help="seconds (default: the category's TTL)")
    p.add_argument("--metadata", type=json.loads, help="a JSON object stored with the answer")
    p = sub.add_parser("invalidate", help="remove an entry, a question's matches, or a tenant's entries")
    _add_scope(p)
    p.add_argument("--entry-id")
    p.add_argument("--question")
    p = sub.add_parser("categories", help="list categories, or change one with --set NAME FIELD=VALUE...")
    p.add_argument("--set", nargs="+", metavar="ITEM", help="NAME then FIELD=VALUE pairs (JSON values)")
    p = sub.add_parser("load", help="report a downstream model's load in [0, 1] (adaptive policy)")
    p.add_argument("load", type=float)
    p.add_argument("--model", default="default")
    sub.add_parser("stats", help="entries and metrics per category")
    p = sub.add_parser("classify", help="the category the classifier assigns to a question")
    p.add_argument("question", nargs="?")
    p.add_argument("--cv", type=int, metavar="FOLDS", help="report k-fold accuracy on the examples instead")
    p = sub.add_parser("fit-verifier", help="refit the verifier on labelled question pairs")
    p.add_argument("--pairs", help="JSON [{text_a, text_b, label}] (default: the shared QQP pairs)")
    p.add_argument("--out", help="where to write the weights (default: the package's verifier.safetensors)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training pairs")
    p.add_argument(
        "--train-floor",
        type=float,
        default=0.70,
        help="the networks learn from training pairs with cosine >= this (0.70)",
    )
    p.add_argument("--seeds", type=int, default=3, help="networks averaged, one per seed (3)")
    p.add_argument(
        "--target-precision",
        type=float,
        default=None,
        help="choose the cut for this precision on the out-of-fold validation (default: cut 0.5)",
    )
    for p in sub.choices.values():
        _add_target(p)
    sc.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.semcache_command == "fit-verifier":
        from semcache.fit import fit_verifier_cli

        _print(
            fit_verifier_cli(
                args.pairs,
                args.out,
                args.limit,
                args.target_precision,
                args.train_floor,
                args.seeds,
            )
        )
        return 0
    if getattr(args, "question", None) is not None:
        from semcache.limits import Limits

        Limits().question(args.question)  # fail fast, before loading the embedder
    if args.url:
        from semcache.client import SemcacheClient

        client = SemcacheClient(args.url, args.api_key)
        try:
            _print(_remote(client, args))
        finally:
            client.close()
        return 0
    cache = _local_cache(args)
    try:
        _print(_local(cache, args))
    finally:
        cache.close()
    return 0


def _local_cache(args: argparse.Namespace):
    from semcache.cache import SemanticCache
    from semcache.settings import SemcacheSettings

    settings = SemcacheSettings()
    overrides = {"redis_url": args.redis, "redis_prefix": args.prefix, "folder": args.folder}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if args.no_verify:
        settings = settings.model_copy(update={"verify": False})
    return SemanticCache(settings.cache_config())


def _category_fields(items: list[str]) -> tuple[str, dict]:
    name, fields = items[0], {}
    for item in items[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected FIELD=VALUE, got {item!r}")
        fields[key] = json.loads(value)
    return name, fields


def _local(cache, args: argparse.Namespace) -> Any:
    cmd, model = args.semcache_command, getattr(args, "model", None) or "default"
    if cmd == "lookup":
        return dataclasses.asdict(
            cache.lookup(args.question, args.tenant, category=args.category, model=model)
        )
    if cmd == "insert":
        return dataclasses.asdict(
            cache.insert(
                args.question,
                args.answer,
                args.tenant,
                category=args.category,
                model=model,
                metadata=args.metadata,
                ttl_s=args.ttl,
            )
        )
    if cmd == "invalidate":
        return {
            "removed": cache.invalidate(
                args.tenant,
                entry_id=args.entry_id,
                question=args.question,
                category=args.category,
                model=args.model,
            )
        }
    if cmd == "categories":
        if args.set:
            name, fields = _category_fields(args.set)
            return cache.update_category(name, **fields).to_dict()
        return {"default": cache.categories.default, "categories": cache.categories.to_list()}
    if cmd == "load":
        return {"model": model, "load": args.load, "relaxed": cache.set_load(model, args.load)}
    if cmd == "classify":
        return _classify(cache, args)
    return cache.stats()


def _classify(cache, args: argparse.Namespace) -> dict:
    if args.cv:
        from semcache.classify import cross_validate, load_examples

        path = cache.config.examples_path()
        if path is None:
            raise ValueError("no classifier examples configured (set KVFUSE_SEMCACHE_CLASSIFIER_EXAMPLES)")
        questions, labels = load_examples(path)
        acc = cross_validate(cache.embedder.embed(questions), labels, folds=args.cv)
        return {"examples": str(path), "n": len(labels), "folds": args.cv, "accuracy": acc}
    if not args.question:
        raise ValueError("give a question, or --cv FOLDS")
    question = cache.config.limits.question(args.question)
    cat, source = cache.resolve_category(cache.embedder.embed_one(question), None)
    return {"category": cat.name, "source": source}


def _remote(client, args: argparse.Namespace) -> Any:
    cmd = args.semcache_command
    scope = {"category": getattr(args, "category", None), "model": getattr(args, "model", None)}
    if cmd == "lookup":
        return client.lookup(args.question, args.tenant, **scope)
    if cmd == "insert":
        return client.insert(
            args.question, args.answer, args.tenant, metadata=args.metadata, ttl_s=args.ttl, **scope
        )
    if cmd == "invalidate":
        return client.invalidate(args.tenant, entry_id=args.entry_id, question=args.question, **scope)
    if cmd == "categories":
        if not args.set:
            return client.categories()
        name, fields = _category_fields(args.set)
        return client.update_category(name, **fields)
    if cmd == "load":
        return client.set_load(args.model, args.load)
    if cmd == "stats":
        return client.stats()
    raise ValueError(f"'{cmd}' runs locally only (drop --url)")


def _print(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
