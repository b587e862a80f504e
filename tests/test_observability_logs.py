"""Access log: one JSON line per request with the documented fields; never a key, never a prompt unless
include_bodies is on."""
from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from fakes.openai_upstream import Fault
from helixagent.config import ACCESS_LOG_FIELDS, ConfigError, load_config_dict
from helixagent.observability.logs import configure_logging, reset_logging
from support.observability import FeatureStandIn, add_stage
from support.servers import wait_until

MASTER = "hk-master-log-test-0123456789abcdef"
VIRTUAL = "sk-hx-virtual-key-abcdef0123456789"  # a key-shaped client key the gateway refuses
PROMPT_WORD = "Zanzibarquux"


@pytest.fixture
def logfile(tmp_path):
    path = tmp_path / "helix.log"

    def setup(**logging_cfg):
        """Configure process logging like `helixagent serve` does; returns the log path and the
        `logging:` block for the gateway's own config."""
        block = {"file": str(path), **logging_cfg}
        cfg = load_config_dict({"logging": block})
        configure_logging(cfg.logging)
        return path, block

    yield setup
    reset_logging()


def lines(path):
    out = []
    for raw in path.read_text().splitlines():
        out.append(orjson.loads(raw))  # every line is one JSON object
    return out


def access(path):
    return [d for d in lines(path) if d.get("logger") == "helixagent.access"]


def test_json_access_lines_fields_and_no_secrets(make_gateway, fake_openai, logfile):
    path, lc = logfile(level="info", format="json")
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)], "auth": {"master_key": MASTER}, "logging": lc})
    add_stage(gw, FeatureStandIn())
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0)
    r = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"{PROMPT_WORD} one"}],
        extra_headers={"x-request-id": "req-log-1", "user-agent": "log-test/1.0", "x-test-cost": "0.125"})
    assert r.headers["x-request-id"] == "req-log-1"
    list(c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"{PROMPT_WORD} s"}],
                                   stream=True))
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "cached"}],
                              extra_headers={"x-test-cache": "hit"})
    # refused client keys: a virtual-looking key and a bearer with the key in the header
    for bad in (VIRTUAL, "Bearer-ish " + VIRTUAL):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gw.url + "/v1", api_key=bad, max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT_WORD}])
    # an upstream error that echoes the upstream key back (the fake does, like OpenAI's 401)
    fake_openai.push(Fault(status=400, message=f"bad request for key {fake_openai.api_key} and {MASTER}"))
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT_WORD}])
    assert wait_until(lambda: len(access(path)) >= 6)
    all_lines = lines(path)
    acc = access(path)
    assert len(acc) == 6
    text = path.read_text()
    for secret in (MASTER, VIRTUAL, fake_openai.api_key, PROMPT_WORD):
        assert secret not in text
    first = acc[0]
    assert set(ACCESS_LOG_FIELDS) <= set(first)
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions"
    assert first["status_code"] == 200 and first["client_request_id"] == "req-log-1"
    assert len(first["request_id"]) == 28  # our own id, the record's key
    assert first["user_agent"] == "log-test/1.0" and first["ip"] == "127.0.0.1"
    assert first["provider"] == "openai" and first["model"] == "gpt-4o-mini"
    assert first["tokens"]["total"] == first["tokens"]["prompt"] + first["tokens"]["completion"] > 0
    assert first["cost"] == 0.125 and first["key_id"] == "master"
    assert first["error"] is None and first["fallbacks"] == 0 and first["stream"] is False
    assert isinstance(first["response_time"], float) and first["response_time"] >= 0
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    stream = acc[1]
    assert stream["stream"] is True and stream["ttft"] is not None and stream["tokens"]["completion"] > 0
    assert acc[2]["cache"] == "hit"
    assert acc[3]["status_code"] == 401 and acc[3]["error"]["code"] == "invalid_api_key"
    assert acc[3]["key_id"] is None
    up = acc[5]
    assert up["status_code"] == 400 and "****" in up["error"]["message"]
    assert len({d["request_id"] for d in acc}) == 6
    assert all(isinstance(d, dict) for d in all_lines)


def test_fields_selection_and_bodies(make_gateway, fake_openai, logfile):
    path, lc = logfile(fields=["timestamp", "status_code", "request_id", "tokens"], include_bodies=True)
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)], "logging": lc})
    openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": PROMPT_WORD}])
    httpx.post(gw.url + "/v1/chat/completions", content=b"{broken " + PROMPT_WORD.encode())
    assert wait_until(lambda: len(access(path)) == 2)
    a, b = access(path)
    assert set(a) == {"timestamp", "status_code", "request_id", "tokens", "level", "logger", "request_body",
                      "response_body"}
    assert a["request_body"]["messages"][0]["content"] == PROMPT_WORD  # embedded as JSON, not a string
    assert a["response_body"]["choices"][0]["message"]["content"]
    assert b["status_code"] == 400 and PROMPT_WORD in b["request_body"]


def test_level_filters_access_log(make_gateway, fake_openai, logfile):
    path, lc = logfile(level="warning")
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)], "logging": lc})
    openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "a"}])
    fake_openai.push(Fault(status=500))
    with pytest.raises(openai.InternalServerError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "a"}])
    assert wait_until(lambda: path.exists() and path.read_text().strip() != "")
    assert access(path) == []
    assert all(d["level"] in ("warning", "error") for d in lines(path))


def test_console_format(make_gateway, fake_openai, logfile):
    path, lc = logfile(format="console")
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)], "auth": {"master_key": MASTER}, "logging": lc})
    openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": PROMPT_WORD}], extra_headers={"x-request-id": "cons-1"})
    assert wait_until(lambda: "cons-1" in path.read_text())
    text = path.read_text()
    line = [ln for ln in text.splitlines() if "helixagent.access" in ln]
    assert len(line) == 1 and "POST /v1/chat/completions 200" in line[0] and "openai/gpt-4o" in line[0]
    assert MASTER not in text and PROMPT_WORD not in text


def test_unknown_field_is_a_config_error():
    with pytest.raises(ConfigError) as ei:
        load_config_dict({"logging": {"fields": ["status_code", "prompt_text"]}})
    assert "logging.fields" in str(ei.value) and "prompt_text" in str(ei.value)
