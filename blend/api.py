"""REST routes of the RAG pipeline: `POST /v1/rag/documents` and `POST /v1/rag/query`.

One `RagPipeline` per tenant over the server's store (`app.state.store`), built on first use; its
passage catalog lives under `$KVFUSE_RAG_DIR/<tenant>` (default `$KVFUSE_HOME/rag`) so passages survive
a restart along with their KV in the disk tier. The model is `app.state.engine` when the app has one, else it is loaded once on the
first request. Both routes need the API key when one is configured (one adds passages, the other returns
answers from a tenant's passages). Bad input is a 400 that names it; malformed bodies are a 422.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from blend.fuse import METHODS
from blend.pipeline import RagConfig, RagPipeline
from engine.paths import kvfuse_home
from kvstore.service.deps import require_api_key
from kvstore.service.heap import freeze_heap

router = APIRouter(prefix="/v1/rag", tags=["rag"], dependencies=[Depends(require_api_key)])
_init_lock = threading.Lock()
# a folder name under the RAG root: never ".", ".." or hidden
_TENANT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

Text = Annotated[StrictStr, Field(min_length=1, max_length=200_000)]
Tenant = Annotated[StrictStr, Field(pattern=_TENANT.pattern)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class Document(_Body):
    text: Text
    id: Annotated[StrictStr, Field(max_length=256)] | None = None
    title: Annotated[StrictStr, Field(max_length=1024)] | None = None


class DocumentsBody(_Body):
    documents: Annotated[list[Text | Document], Field(min_length=1, max_length=1000)]
    tenant: Tenant = "default"


class QueryBody(_Body):
    question: Annotated[StrictStr, Field(min_length=1, max_length=100_000)]
    passages: Annotated[list[Text], Field(max_length=64)] | None = None
    passage_ids: Annotated[list[StrictStr], Field(max_length=64)] | None = None
    top_k: Annotated[StrictInt, Field(ge=1, le=64)] | None = None
    method: StrictStr | None = Field(default=None, description=f"one of {', '.join(METHODS)}")
    max_new_tokens: Annotated[StrictInt, Field(ge=0, le=1024)] | None = None
    tenant: Tenant = "default"


def _engine(request: Request) -> Any:
    state = request.app.state
    if getattr(state, "engine", None) is None:
        from engine.loader import load_model
        from engine.runner import Engine

        state.engine = Engine(load_model())
        freeze_heap()  # the model's objects live as long as the server
    return state.engine


def get_pipeline(request: Request, tenant: str) -> RagPipeline:
    state = request.app.state
    with _init_lock:
        pipelines = getattr(state, "rag", None)
        if pipelines is None:
            pipelines = state.rag = {}
        if tenant not in pipelines:
            folder = tenant_dir(tenant)
            config = RagConfig(progress=False)
            pipelines[tenant] = RagPipeline(
                _engine(request), state.store, config=config, tenant=tenant, folder=folder
            )
        return pipelines[tenant]


def rag_dir() -> Path:
    """Where tenants' passage catalogs live: `$KVFUSE_RAG_DIR`, else `$KVFUSE_HOME/rag`."""
    env = os.environ.get("KVFUSE_RAG_DIR")
    return Path(env).expanduser() if env else kvfuse_home() / "rag"


def tenant_dir(tenant: str) -> Path:
    """A tenant's catalog folder under `rag_dir()`; ValueError for a name that is not a plain folder
    name (`..` would write the catalog outside the RAG root, `.` into the root itself)."""
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise ValueError(
            f"invalid tenant {tenant!r:.80}: 1-64 chars of [A-Za-z0-9_.-], starting with a letter, digit or _"
        )
    return rag_dir() / tenant


def _bad_request(err: Exception) -> HTTPException:
    return HTTPException(400, str(err))


@router.post("/documents")
def add_documents(body: DocumentsBody, request: Request) -> dict[str, Any]:
    """Cut documents into passages, compute each passage's KV once and store it."""
    pipeline = get_pipeline(request, body.tenant)
    docs = [d if isinstance(d, str) else d.model_dump(exclude_none=True) for d in body.documents]
    try:
        result = pipeline.ingest(docs)
    except (ValueError, TypeError) as e:
        raise _bad_request(e) from None
    return {
        "passages": [{"id": p.id, "doc_id": p.doc_id, "tokens": p.tokens} for p in result.passages],
        "computed": result.computed,
        "reused": result.reused,
        "seconds": result.seconds,
    }


@router.post("/query")
def query(body: QueryBody, request: Request) -> dict[str, Any]:
    """Answer a question from given passages, ingested passage ids, or the top-k retrieved passages."""
    pipeline = get_pipeline(request, body.tenant)
    try:
        answer = pipeline.answer(
            body.question,
            passages=body.passages,
            passage_ids=body.passage_ids,
            top_k=body.top_k,
            method=body.method,
            max_new_tokens=body.max_new_tokens,
        )
    except (ValueError, TypeError) as e:
        raise _bad_request(e) from None
    return answer.to_dict()
