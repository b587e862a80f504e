"""With ``encryption.enabled`` the Redis cache stores answers encrypted with the records' keys (real Redis)."""
from __future__ import annotations

import base64
import os

import pytest
import redis

from conftest import need_redis
from support.keys import MASTER, http, redis_cleanup, unique_prefix

pytestmark = pytest.mark.redis
SECRET_WORD = "zebracornflakes"   # in the prompt; the fake upstream echoes it into the answer


def _keyfile(tmp_path, name: str, *ids: str) -> str:
    path = tmp_path / f"{name}.keys"
    path.write_text("\n".join(f"{i}:{KEYS[i]}" for i in ids) + "\n")
    return str(path)


KEYS = {i: base64.b64encode(os.urandom(32)).decode() for i in ("k2024-01-01", "k2025-06-01")}


@pytest.fixture
def redis_prefix():
    url = need_redis()
    prefix = unique_prefix()
    yield url, prefix
    redis_cleanup(url, prefix)


def _gw(make_gateway, fake_openai, url, prefix, keyfile: str | None):
    cfg = {"auth": {"master_key": MASTER},
           "providers": [fake_openai.provider(max_retries=0)],
           "cache": {"enabled": True, "type": "redis", "redis_url": url, "key_prefix": f"{prefix}:cache:",
                     "redis_timeout": 3.0}}
    if keyfile is not None:
        cfg["encryption"] = {"enabled": True, "key_file": keyfile}
    return make_gateway(cfg)


def _ask(gw, text: str = f"tell me about {SECRET_WORD}"):
    return http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {MASTER}"},
                     json={"model": "gpt-4o-mini", "temperature": 0,
                           "messages": [{"role": "user", "content": text}]})


def _raw_values(url: str, prefix: str) -> list[bytes]:
    r = redis.Redis.from_url(url)
    try:
        return [r.get(k) for k in r.scan_iter(match=f"{prefix}:cache:*}}", count=1000)]
    finally:
        r.close()


def test_redis_cache_values_are_encrypted_and_hits_still_serve(make_gateway, fake_openai, redis_prefix, tmp_path,
                                                               monkeypatch):
    monkeypatch.delenv("HELIXAGENT_ENCRYPTION_KEYS", raising=False)
    url, prefix = redis_prefix
    gw = _gw(make_gateway, fake_openai, url, prefix, _keyfile(tmp_path, "a", "k2024-01-01"))
    first = _ask(gw)
    assert first.status_code == 200 and first.headers["x-helixagent-cache"] == "MISS"
    answer = first.json()["choices"][0]["message"]["content"]
    assert SECRET_WORD in answer
    vals = _raw_values(url, prefix)
    assert len(vals) == 1
    raw = vals[0]
    assert SECRET_WORD.encode() not in raw and b"choices" not in raw and b"echo:" not in raw
    assert b"k2024-01-01" in raw[:20]  # the key id travels with the value (rotation)
    hit = _ask(gw)
    assert hit.status_code == 200 and hit.headers["x-helixagent-cache"] == "HIT"
    assert hit.json()["choices"][0]["message"]["content"] == answer
    assert len(fake_openai.calls) == 1
    # bound to its cache key: the same ciphertext copied under another key is not served
    r = redis.Redis.from_url(url)
    try:
        other = _ask(gw, "another question")
        assert other.headers["x-helixagent-cache"] == "MISS"
        keys = list(r.scan_iter(match=f"{prefix}:cache:*}}"))  # the entries (<prefix>{hash}), not flight keys
        assert len(keys) == 2
        ka, kb = keys
        va, vb = r.get(ka), r.get(kb)
        r.set(kb, va)  # the first answer planted under the second question's key
        r.set(ka, vb)
    finally:
        r.close()
    calls = len(fake_openai.calls)
    moved = _ask(gw, "another question")
    assert moved.status_code == 200 and moved.headers["x-helixagent-cache"] == "MISS"
    assert len(fake_openai.calls) == calls + 1
    assert gw.app.services["cache"].stats.errors >= 1


def test_rotated_key_still_in_the_ring_decrypts_and_a_removed_one_is_a_miss(make_gateway, fake_openai,
                                                                           redis_prefix, tmp_path, monkeypatch):
    monkeypatch.delenv("HELIXAGENT_ENCRYPTION_KEYS", raising=False)
    url, prefix = redis_prefix
    old = _gw(make_gateway, fake_openai, url, prefix, _keyfile(tmp_path, "old", "k2024-01-01"))
    assert _ask(old).headers["x-helixagent-cache"] == "MISS"
    # rotated: a new active key, the old one still in the ring -> the old entry is a hit
    rotated = _gw(make_gateway, fake_openai, url, prefix, _keyfile(tmp_path, "rot", "k2024-01-01", "k2025-06-01"))
    r = _ask(rotated)
    assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "HIT"
    assert SECRET_WORD in r.json()["choices"][0]["message"]["content"]
    assert len(fake_openai.calls) == 1
    # the old key removed: the entry is a miss (served from upstream), never a 500
    new_only = _gw(make_gateway, fake_openai, url, prefix, _keyfile(tmp_path, "new", "k2025-06-01"))
    r = _ask(new_only)
    assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "MISS"
    assert SECRET_WORD in r.json()["choices"][0]["message"]["content"]
    assert len(fake_openai.calls) == 2
    assert new_only.app.services["cache"].stats.errors == 1
    # ... and re-stored under the active key: the next request is a hit there
    assert _ask(new_only).headers["x-helixagent-cache"] == "HIT"
    assert all(b"k2025-06-01" in v[:20] for v in _raw_values(url, prefix))
