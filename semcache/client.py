"""A small HTTP client for a server's `/v1/semcache` routes (used by the CLI's `--url`)."""

from __future__ import annotations

import os
from typing import Any

import httpx


class SemcacheClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        key = api_key or os.environ.get("KVFUSE_API_KEY")
        headers = {"X-API-Key": key} if key else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/") + "/v1/semcache", headers=headers, timeout=timeout_s
        )

    def _send(self, method: str, path: str, body: dict | None = None) -> Any:
        resp = self._http.request(method, path, json=body)
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ValueError(f"{method} {path} -> HTTP {resp.status_code}: {detail}")
        return resp.json()

    def lookup(self, question: str, tenant: str, **kw: Any) -> dict:
        return self._send("POST", "/lookup", {"question": question, "tenant": tenant, **_given(kw)})

    def insert(self, question: str, answer: str, tenant: str, **kw: Any) -> dict:
        return self._send(
            "POST", "/insert", {"question": question, "answer": answer, "tenant": tenant, **_given(kw)}
        )

    def invalidate(self, tenant: str, **kw: Any) -> dict:
        return self._send("POST", "/invalidate", {"tenant": tenant, **_given(kw)})

    def categories(self) -> dict:
        return self._send("GET", "/categories")

    def update_category(self, name: str, **fields: Any) -> dict:
        return self._send("PUT", f"/categories/{name}", _given(fields))

    def set_load(self, model: str, load: float) -> dict:
        return self._send("POST", "/load", {"model": model, "load": load})

    def stats(self) -> dict:
        return self._send("GET", "/stats")

    def close(self) -> None:
        self._http.close()


def _given(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if v is not None}
