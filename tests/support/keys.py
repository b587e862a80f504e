"""Helpers for auth/limits tests: create keys through the admin API, send requests, clean Redis."""
from __future__ import annotations

import uuid
from typing import Any

import httpx

MASTER = "master-test-key-0123456789"
# one client for all helpers: building an httpx client (SSL context) costs ~40 ms each time
http = httpx.Client(timeout=10)
MODEL = "mock-1"


def admin_create(gw: Any, master: str = MASTER, **body: Any) -> dict[str, Any]:
    body.setdefault("role", "user")
    r = http.post(gw.url + "/admin/keys", json=body, headers={"authorization": f"Bearer {master}"}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()


def admin_post(gw: Any, path: str, body: Any = None, master: str = MASTER) -> httpx.Response:
    return http.post(gw.url + path, json=body, headers={"authorization": f"Bearer {master}"}, timeout=10)


def chat(gw: Any, key: str | None, text: str = "hello", **params: Any) -> httpx.Response:
    h = {"authorization": f"Bearer {key}"} if key else {}
    return http.post(gw.url + "/v1/chat/completions", headers=h, timeout=10,
                      json={"model": MODEL, "messages": [{"role": "user", "content": text}], **params})


def unique_prefix() -> str:
    return "hxtest-" + uuid.uuid4().hex[:12]


def redis_cleanup(url: str, prefix: str) -> None:
    import redis
    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()
