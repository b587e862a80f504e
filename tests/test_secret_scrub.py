"""No configured secret leaves the gateway (issue 12, item 7).

An upstream that echoes, in its error messages, every secret the gateway was configured with: the key
and headers it received, other providers' keys, the master key, the record-encryption key, and the
passwords of the database, cache and provider URLs.  The gateway used to scrub only the answering
provider's own key (and key-shaped strings), so the rest reached clients and records.  Checked: every
response the client gets (OpenAI and Anthropic formats, streamed and not, HTTP errors and errors in the
middle of a stream), the stored records (decrypted), and the log file.
"""
from __future__ import annotations

import base64
import logging
import re

import httpx
import orjson
import pytest
import sqlalchemy as sa
from aiohttp import web

from conftest import need_postgres
from helixagent.config import load_config_dict
from helixagent.observability.logs import configure_logging, reset_logging
from helixagent.redaction import SecretRegistry, config_secrets, url_password
from helixagent.store.crypto import Keyring, parse_keys
from helixagent.store.db import make_sync_engine
from support.pg import fresh_schema
from support.servers import AiohttpServer, wait_until

MASTER = "master-secret-8888888888"
OA_KEY = "sk-oa-1111111111111111"
ANT_KEY = "ant-key-3333333333"            # not key-shaped: only the registry knows it
GEM_KEY = "gem-key-5555555555"
SPARE_KEY = "spare-key-7777777777"        # a provider that never answers: its key is still a secret
OA_HEADER = "tenant-tok-1212121212"       # providers[].headers values
ANT_HEADER = "relay-secret-4444444444"
SPARE_URL_PASS = "spare-url-pass-6666"
REDIS_PASS = "redis-pass-aaaaaaaaaa"
PG_PASS = "pg-pass-9999999999"
ENC_KEY = base64.b64encode(b"K" * 32).decode()
SECRETS = [MASTER, OA_KEY, ANT_KEY, GEM_KEY, SPARE_KEY, OA_HEADER, ANT_HEADER, SPARE_URL_PASS, REDIS_PASS,
           PG_PASS, ENC_KEY]


class EchoUpstream:
    """One fake for the three wire formats.  Every answer is an error (the mode is named in the request's
    text: ``mode=400`` ``500`` ``401`` ``midstream``) whose message echoes the headers it received and a
    list of other secrets, in the vendor's own error shape."""

    def __init__(self) -> None:
        self.leak = " ".join(SECRETS)
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self.handle)
        self.server = AiohttpServer(app)
        self.url = self.server.url
        self.calls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        raw = await request.read()
        m = re.search(rb"mode=(\w+)", raw)
        mode = m.group(1).decode() if m else "400"
        seen = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
        message = f"upstream says: request refused (headers {seen}) (also {self.leak})"
        wire = "anthropic" if request.path.endswith("/messages") else "gemini" if ":" in request.path else "openai"
        if mode == "midstream":
            resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            if wire == "anthropic":
                start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                              "model": "claude-x", "content": [], "stop_reason": None,
                                                              "usage": {"input_tokens": 1, "output_tokens": 0}}}
                await resp.write(b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n")
                err = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
                await resp.write(b"event: error\ndata: " + orjson.dumps(err) + b"\n\n")
            elif wire == "gemini":
                err = {"error": {"code": 500, "message": message, "status": "INTERNAL"}}
                await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
            else:
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await resp.write(b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error"}})
                                 + b"\n\n")
            await resp.write_eof()
            return resp
        status = int(mode)
        if wire == "anthropic":
            body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        elif wire == "gemini":
            body = {"error": {"code": status, "message": message,
                              "status": {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED"}.get(status, "INTERNAL")}}
        else:
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def echo():
    fake = EchoUpstream()
    yield fake
    fake.close()


@pytest.fixture
def logfile(tmp_path):
    path = tmp_path / "helix.log"
    configure_logging(load_config_dict({"logging": {"file": str(path), "format": "json"}}).logging)
    yield path
    reset_logging()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/records.db"
        return
    gen = fresh_schema(need_postgres())
    url = next(gen)
    # the local server trusts loopback, so a password in the URL is accepted (and must never be shown)
    yield re.sub(r"://([^:@/]+)@", rf"://\1:{PG_PASS}@", url, count=1)
    gen.close()


def gateway_config(upstream: str, db_url: str, logfile) -> dict:
    ret = {"max_retries": 0, "timeout_ms": 5000}
    return {
        "auth": {"master_key": MASTER},
        "providers": [
            {"name": "oa", "type": "openai", "base_url": upstream + "/v1", "api_key": OA_KEY,
             "headers": {"x-tenant-token": OA_HEADER}, "models": ["gpt-4o-mini"], **ret},
            {"name": "claude", "type": "anthropic", "base_url": upstream, "api_key": ANT_KEY,
             "headers": {"x-relay-secret": ANT_HEADER}, "models": ["claude-x"], **ret},
            {"name": "gem", "type": "gemini", "base_url": upstream, "api_key": GEM_KEY, "models": ["gemini-x"], **ret},
            {"name": "spare", "type": "openai_compatible", "base_url": f"http://svc:{SPARE_URL_PASS}@127.0.0.1:9/v1",
             "api_key": SPARE_KEY, "models": ["spare-model"], **ret},
        ],
        "cache": {"enabled": False, "redis_url": f"redis://:{REDIS_PASS}@127.0.0.1:9/0"},
        "database": {"url": db_url, "auto_migrate": True},
        "encryption": {"enabled": True},
        "logging": {"file": str(logfile), "format": "json"},
    }


def leaks(text: str, secrets: list[str] = SECRETS) -> list[str]:
    return [s for s in secrets if s in text]


def test_every_configured_secret_is_scrubbed_from_responses_records_and_logs(make_gateway, echo, db_url,
                                                                          logfile, monkeypatch):
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", f"k1:{ENC_KEY}")
    secrets = SECRETS if PG_PASS in db_url else [s for s in SECRETS if s != PG_PASS]  # SQLite: no password
    echo.leak = " ".join(secrets)
    gw = make_gateway(gateway_config(echo.url, db_url, logfile))
    h = {"authorization": f"Bearer {MASTER}"}
    seen: list[str] = []
    with httpx.Client(timeout=15) as c:
        for model in ("gpt-4o-mini", "claude-x", "gemini-x"):
            for mode in ("400", "401", "500", "midstream"):
                for stream in (False, True):
                    if mode == "midstream" and not stream:
                        continue
                    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": f"mode={mode}"}]}
                    r = c.post(gw.url + "/v1/chat/completions", json=body, headers=h)
                    seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
                    assert r.status_code != 200 or stream, r.text
            # the Anthropic client format, for every provider
            body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "mode=400"}]}
            r = c.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": MASTER})
            seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
    assert echo.calls >= 20  # (a breaker may open after repeated failures)
    relayed = "\n".join(seen)
    assert leaks(relayed, secrets) == []
    # the errors are still relayed, with the secrets masked
    assert relayed.count("upstream says: request refused") >= 20 and "****" in relayed

    # the records, bodies decrypted
    assert gw.run(gw.app.services["records"].writer.flush(10))
    ring = Keyring(parse_keys(f"k1:{ENC_KEY}", "test"))
    eng = make_sync_engine(db_url)
    try:
        with eng.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(sa.text("select * from completions"))]
    finally:
        eng.dispose()
    assert len(rows) >= 24
    stored = []
    for row in rows:
        for col in ("request_body", "response_body"):
            blob = row.pop(col)
            if blob:
                stored.append(ring.decrypt(bytes(blob), row["enc_key_id"], row["request_id"], col).decode())
        stored.append(repr(row))
    stored_text = "\n".join(stored)
    assert leaks(stored_text, secrets) == []
    assert stored_text.count("upstream says: request refused") >= 20

    # the logs (the access lines carry each error's message)
    logging.getLogger("helixagent.test").warning("connecting to %s failed", db_url)
    assert wait_until(lambda: logfile.read_text().count('"helixagent.access"') >= 24, 5)
    logged = logfile.read_text()
    assert "upstream says: request refused" in logged
    assert leaks(logged, secrets) == []


def test_the_registry_knows_every_kind_of_secret(monkeypatch):
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", f"k1:{ENC_KEY}")
    cfg = load_config_dict({
        "auth": {"master_key": MASTER, "redis_url": f"redis://u:{REDIS_PASS}@h:6379/0"},
        "providers": [{"name": "oa", "type": "openai", "api_key": OA_KEY, "headers": {"x-tenant-token": OA_HEADER}},
                      {"name": "spare", "type": "openai_compatible", "base_url": f"http://svc:{SPARE_URL_PASS}@h/v1"}],
        "database": {"url": f"postgresql://app:{PG_PASS}@db:5432/helix"},
        "rate_limits": {"redis_url": "redis://:short@h/0"},
        "encryption": {"enabled": True},
    })
    found = set(config_secrets(cfg))
    assert {MASTER, OA_KEY, OA_HEADER, SPARE_URL_PASS, PG_PASS, REDIS_PASS, ENC_KEY} <= found
    reg = SecretRegistry()
    reg.add(found)
    text = f"a {PG_PASS} b {OA_KEY}x c {ENC_KEY} d short e sk-anything-keyshaped f Bearer abcdefgh"
    assert reg.scrub(text) == "a **** b ****x c **** d short e **** f ****"
    # a secret echoed URL-encoded is recognised too
    reg.add(["p@ss/word+1"])
    assert reg.scrub("u=p%40ss%2Fword%2B1") == "u=****"
    assert url_password("postgresql://u:p%40ss@h/db") == "p%40ss" and url_password("sqlite:///x.db") is None


def test_redis_urls_of_every_kind_give_up_their_secrets_and_are_shown_masked():
    from helixagent.redaction import mask_url
    cfg = load_config_dict({
        "redis": {"url": "redis+sentinel://:sentinel-node-pw@s1:26379,s2:26379/mymaster/0"
                         "?sentinel_password=sent%2Fpw-9&ssl_password=tls-key-pw"},
        "routing": {"shared_health": {"redis_url": "rediss://health:health-pw-77@r:6380/0"}},
    })
    found = set(config_secrets(cfg))
    assert {"sentinel-node-pw", "sent%2Fpw-9", "sent/pw-9", "health-pw-77"} <= found
    shown = mask_url(cfg.redis.url or "")
    assert not any(s in shown for s in ("sentinel-node-pw", "sent%2Fpw-9", "tls-key-pw")), shown
    assert shown.startswith("redis+sentinel://:****@s1:26379") and "sentinel_password=****" in shown
    assert mask_url("rediss://health:health-pw-77@r:6380/0") == "rediss://health:****@r:6380/0"
    assert mask_url("user:pw@host") == "****@host"   # no scheme: only what follows the @


def test_log_records_are_scrubbed_as_they_are_made(tmp_path):
    from helixagent.redaction import REGISTRY, install_log_filter
    secret = "log-only-secret-0f0f0f0f"
    REGISTRY.add([secret])
    install_log_filter()
    path = tmp_path / "l.log"
    configure_logging(load_config_dict({"logging": {"file": str(path), "format": "json"}}).logging)
    try:
        log = logging.getLogger("helixagent.test")
        log.error("plain %s and %r", secret, {"k": secret})
        try:
            raise RuntimeError(f"failed with {secret}")
        except RuntimeError:
            log.exception("boom")
        log.error(f"in the message {secret}")
    finally:
        reset_logging()
    text = path.read_text()
    assert secret not in text and text.count("****") >= 4 and "RuntimeError" in text
