"""Property-based fuzzing of every client endpoint at the edge (hypothesis), over real HTTP, against a
gateway with token and cost limits (the token estimator runs on every request) and a virtual key.

For each endpoint: bodies built from the vendor's documented types are accepted (200 from the mock
provider); the same bodies with one value replaced by a value of a type no field there admits are a 400
in that format's error shape naming the parameter; random JSON and non-JSON are a 4xx; nothing is ever a
5xx; and the gateway is healthy after.  Bounded: a few hundred examples per endpoint, no deadline."""
from __future__ import annotations

import http.client
import string
import urllib.parse
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.keys import MASTER

MODEL = "mock-1"
EXAMPLES = 80   # per property: valid, invalid and random bodies -> ~240 cases per endpoint
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
STATS: dict[str, dict[str, int]] = {}


class Client:
    """A keep-alive HTTP/1.1 client on http.client (a fraction of httpx's CPU per request), that sends
    any bytes as the body (httpx refuses some) and reconnects when the server closed the connection."""

    def __init__(self, url: str, headers: dict[str, str]):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.headers = headers
        self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=20)

    def request(self, method: str, path: str, json: Any = None, content: bytes | None = None,
                headers: dict[str, str] | None = None) -> "Reply":
        body = orjson.dumps(json) if json is not None else content
        h = {**self.headers, **(headers or {})}
        if body is not None:
            h.setdefault("content-type", "application/json")
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=h)
                r = self.conn.getresponse()
                return Reply(r.status, r.read())
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()   # the server closed the connection (a 4xx may say Connection: close)
                self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=20)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, json: Any = None, content: bytes | None = None,
             headers: dict[str, str] | None = None) -> "Reply":
        return self.request("POST", path, json, content, headers)

    def get(self, path: str) -> "Reply":
        # non-ASCII as UTF-8 percent escapes; '%', '&', '=' and the rest as generated
        return self.request("GET", urllib.parse.quote(path, safe="/?=&%:+-._~"))

    def close(self) -> None:
        self.conn.close()


class Reply:
    def __init__(self, status: int, body: bytes):
        self.status_code = status
        self.content = body
        self.text = body.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: Any) -> Any:
    from support.servers import GatewayServer
    d = tmp_path_factory.mktemp("fuzz")
    g = GatewayServer({"auth": {"master_key": MASTER},
                       "providers": [{"name": "mock", "type": "mock"}],  # explicit: not a stand-in, /health ok
                       "database": {"url": f"sqlite:///{d}/h.db", "spool_dir": str(d / "spool")},
                       "routing": {"max_cost_per_request": 10.0},
                       "rate_limits": {"api_key": {"requests_per_minute": 10**6, "tokens_per_minute": 10**9},
                                       "user": {"tokens_per_day": 10**9}, "cost": {"api_key": {"per_day": 10**6}},
                                       # mock-1 has no catalogue price: the budget path runs at a default one
                                       "unknown_price": "default",
                                       "default_price_per_mtok": {"input": 1.0, "output": 2.0}}})
    admin = Client(g.url, {"authorization": f"Bearer {MASTER}"})
    r = admin.post("/admin/keys", json={"user_id": "fuzz", "role": "user"})
    assert r.status_code == 201, r.text
    user = Client(g.url, {"authorization": f"Bearer {r.json()['key']}"})
    yield g, user, admin
    user.close()
    admin.close()
    g.close()
    print("\nfuzz cases per endpoint (valid/invalid/random, 5xx):",
          {k: v for k, v in sorted(STATS.items())})
    assert all(v.get("5xx", 0) == 0 for v in STATS.values())


def _count(endpoint: str, kind: str, r: Reply) -> None:
    s = STATS.setdefault(endpoint, {})
    s[kind] = s.get(kind, 0) + 1
    if r.status_code >= 500:
        s["5xx"] = s.get("5xx", 0) + 1
    assert r.status_code < 500, (endpoint, kind, r.status_code, r.text)


def _openai_error(r: Reply, need_param: bool) -> None:
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if need_param:
        assert r.status_code == 400 and isinstance(err["param"], str) and err["param"], err


def _anthropic_error(r: Reply, need_param: bool) -> None:
    assert 400 <= r.status_code < 500, r.text
    b = r.json()
    assert b["type"] == "error" and set(b["error"]) == {"type", "message"}, b
    assert b["error"]["type"] == "invalid_request_error", b
    if need_param:  # Anthropic's shape has no param field: the message starts with the path
        head = b["error"]["message"].split(":")[0]
        assert r.status_code == 400 and head and " " not in head, b


# -- strategies: valid bodies ----------------------------------------------------------------------------

text = st.text(string.ascii_letters + string.digits + " .,!?é中\n", min_size=1, max_size=30)
name = st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9_]{0,15}\Z")
FREE = {"parameters", "input_schema", "input", "x_extra", "limits"}   # free-form subtrees: not mutated

o_text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
o_image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
    {"url": st.just("https://example.com/a.png")}, optional={"detail": st.sampled_from(["auto", "low", "high"])})})
o_call = st.fixed_dictionaries({"id": name, "type": st.just("function"),
                                "function": st.fixed_dictionaries({"name": name, "arguments": st.just('{"a":1}')})})
o_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer"]),
                           "content": st.one_of(text, st.lists(o_text_part, min_size=1, max_size=2))}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
        text, st.lists(st.one_of(o_text_part, o_image_part), min_size=1, max_size=3))},
        optional={"name": name}),
    st.fixed_dictionaries({"role": st.just("assistant")}, optional={
        "content": st.one_of(st.none(), text), "tool_calls": st.lists(o_call, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": name, "content": text}),
)
o_tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": name}, optional={"description": text, "parameters": st.just({"type": "object", "properties": {}})})})
o_sampling = {"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "max_tokens": st.integers(1, 500),
              "stop": st.one_of(text, st.lists(text, max_size=3), st.none()), "seed": st.integers(-2**40, 2**40),
              "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "user": text,
              "stream": st.booleans(), "x_extra": st.dictionaries(name, st.integers(-2**63, 2**63 - 1), max_size=2)}
o_chat = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(o_message, min_size=1, max_size=4)},
                               optional={**o_sampling, "tools": st.lists(o_tool, max_size=2),
                                         "tool_choice": st.sampled_from(["none", "auto"]),
                                         "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
                                         "logprobs": st.booleans(), "parallel_tool_calls": st.booleans()})
o_completion = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": st.one_of(text, st.lists(text, min_size=1,
                                                                                                  max_size=1))},
                                     optional={**o_sampling, "echo": st.booleans()})
o_embeddings = st.fixed_dictionaries({"model": st.just("mock-embed"), "input": st.one_of(
    text, st.lists(text, min_size=1, max_size=4), st.lists(st.integers(0, 50000), min_size=1, max_size=8))},
    optional={"dimensions": st.integers(1, 64), "encoding_format": st.sampled_from(["float", "base64"]),
              "user": text})

a_text = st.fixed_dictionaries({"type": st.just("text"), "text": text})
a_image = st.fixed_dictionaries({"type": st.just("image"), "source": st.fixed_dictionaries({
    "type": st.just("base64"), "media_type": st.sampled_from(["image/png", "image/jpeg"]), "data": st.just("aGVsbG8=")})})
a_message = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(text, st.lists(st.one_of(a_text, a_image),
                                                                                         min_size=1, max_size=3))}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.one_of(text, st.lists(a_text, min_size=1,
                                                                                            max_size=2))}))
a_tool = st.fixed_dictionaries({"name": name, "input_schema": st.just({"type": "object", "properties": {}})},
                               optional={"description": text})
a_optional = {"system": st.one_of(text, st.lists(a_text, min_size=1, max_size=2)), "temperature": st.floats(0, 1),
              "top_p": st.floats(0, 1), "top_k": st.integers(0, 50), "stop_sequences": st.lists(text, max_size=3),
              "stream": st.booleans(), "metadata": st.fixed_dictionaries({"user_id": text}),
              "tools": st.lists(a_tool, min_size=1, max_size=2, unique_by=lambda t: t["name"])}
a_messages = st.fixed_dictionaries({"model": st.just(MODEL), "max_tokens": st.integers(1, 500),
                                    "messages": st.lists(a_message, min_size=1, max_size=4).filter(
                                        lambda ms: ms[0]["role"] == "user")}, optional=a_optional)
a_count = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(a_message, min_size=1, max_size=3)},
                                optional=a_optional)
k_create = st.fixed_dictionaries({}, optional={
    "user_id": text.filter(str.strip), "application": text.filter(str.strip),
    "role": st.sampled_from(["user", "readonly", "admin"]),
    "expires_in": st.one_of(st.integers(60, 10**8), st.sampled_from(["30d", "24h", "90s", "5m"])),
    "limits": st.fixed_dictionaries({}, optional={"requests_per_minute": st.integers(1, 10**6),
                                                  "tokens_per_minute": st.integers(1, 10**9)})})


# -- strategies: invalid bodies (one value replaced by a type nothing there admits) -------------------------

def _paths(v: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if path else []
    if isinstance(v, dict):
        for k, x in v.items():
            if k not in FREE:
                out += _paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, path + (i,))
    return out


def _wrong(v: Any) -> list[Any]:
    if isinstance(v, bool):
        return ["x", 5, [1]]
    if isinstance(v, (int, float)):
        return ["x", True, {"k": 1}, [1]]
    if isinstance(v, str):
        return [True, {"k": 1}, [1]]
    if isinstance(v, dict):
        return ["x", 5, [1]]
    if isinstance(v, list):
        return [5, {"k": 1}]
    return [{"k": 1}, [1]]   # null


@st.composite
def mutated(draw: Any, valid: Any) -> Any:
    body = draw(valid)
    paths = _paths(body)
    if not paths:
        return body, False
    path = draw(st.sampled_from(paths))
    cur = body
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = draw(st.sampled_from(_wrong(cur[path[-1]])))
    return body, True


json_value = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
                          | st.text(max_size=10),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=12)
random_object = st.dictionaries(st.sampled_from(["model", "messages", "prompt", "input", "max_tokens", "role",
                                                 "content", "tools", "stop", "user_id", "expires_in", "x"]),
                                json_value, max_size=5)
garbage = st.one_of(st.binary(max_size=60), st.just(b""), st.just(b"{"), st.just(b"[1,2]"), st.just(b"null"),
                    st.just(b'{"model": NaN}'), st.just(b'{"a": 1e400}'), st.just(b'{"a": 123456789012345678901234567890}'))
randoms = st.one_of(random_object.map(orjson.dumps), json_value.map(orjson.dumps), garbage)

e_member = st.fixed_dictionaries({"provider": st.just("mock"), "model": st.sampled_from(["mock-1", "mock-2"])},
                                 optional={"weight": st.floats(0, 10)})
e_config = st.one_of(
    st.fixed_dictionaries({"strategy": st.sampled_from(["majority", "confidence_weighted", "quality_weighted"]),
                           "members": st.lists(e_member, min_size=1, max_size=2, unique_by=lambda m: m["model"])},
                          optional={"min_providers": st.just(1), "confidence_threshold": st.floats(0, 1),
                                    "fallback_to_best": st.booleans(), "preferred_providers": st.just(["mock"]),
                                    "panel_timeout_ms": st.integers(1000, 60000)}),
    st.fixed_dictionaries({"strategy": st.just("judge"), "providers": st.just(["mock"]),
                           "judge": st.fixed_dictionaries({"provider": st.just("mock")})},
                          optional={"judge_mode": st.sampled_from(["synthesis", "pick"])}),
    st.fixed_dictionaries({"strategy": st.just("debate"), "providers": st.just(["mock"]),
                           "rounds": st.integers(1, 2)}))
o_ensemble = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(o_message, min_size=1, max_size=3),
                                    "ensemble_config": e_config},
                                   optional={"temperature": st.floats(0, 2), "max_tokens": st.integers(1, 200),
                                             "stream": st.booleans()})

ENDPOINTS = [("/v1/chat/completions", o_chat, "openai"), ("/v1/completions", o_completion, "openai"),
             ("/v1/ensemble/completions", o_ensemble, "openai"),
             ("/v1/embeddings", o_embeddings, "openai"), ("/v1/messages", a_messages, "anthropic"),
             ("/v1/messages/count_tokens", a_count, "anthropic")]


def _check_error(fmt: str, r: Reply, need_param: bool) -> None:
    (_anthropic_error if fmt == "anthropic" else _openai_error)(r, need_param)


@pytest.mark.parametrize("path,valid,fmt", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_valid_bodies_are_accepted(gw: Any, path: str, valid: Any, fmt: str) -> None:
    _, user, _ = gw

    @SETTINGS
    @given(valid)
    def run(body: Any) -> None:
        r = user.post(path, json=body)
        _count(path, "valid", r)
        assert r.status_code == 200, (body, r.text)
    run()


@pytest.mark.parametrize("path,valid,fmt", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_wrong_types_at_every_level_are_400s_naming_the_param(gw: Any, path: str, valid: Any, fmt: str) -> None:
    _, user, _ = gw

    @SETTINGS
    @given(mutated(valid))
    def run(case: Any) -> None:
        body, changed = case
        r = user.post(path, json=body)
        _count(path, "invalid", r)
        if changed:
            _check_error(fmt, r, need_param=True)
    run()


@pytest.mark.parametrize("path,valid,fmt", ENDPOINTS + [("/admin/keys", k_create, "openai")],
                         ids=[e[0] for e in ENDPOINTS] + ["/admin/keys"])
def test_random_bodies_are_4xx(gw: Any, path: str, valid: Any, fmt: str) -> None:
    _, user, admin = gw
    client = admin if path.startswith("/admin") else user

    @SETTINGS
    @given(randoms)
    def run(raw: bytes) -> None:
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        _count(path, "random", r)
        if r.status_code != 200 and r.status_code != 201:
            _check_error(fmt, r, need_param=False)
    run()


def test_admin_key_bodies(gw: Any) -> None:
    _, _, admin = gw

    @SETTINGS
    @given(k_create)
    def valid(body: Any) -> None:
        r = admin.post("/admin/keys", json=body)
        _count("/admin/keys", "valid", r)
        assert r.status_code == 201, (body, r.text)
    valid()

    @SETTINGS
    @given(mutated(k_create.filter(bool)))
    def invalid(case: Any) -> None:
        body, changed = case
        r = admin.post("/admin/keys", json=body)
        _count("/admin/keys", "invalid", r)
        if changed:
            _openai_error(r, need_param=True)
    invalid()

    victim = admin.post("/admin/keys", json={"user_id": "victim"}).json()["id"]

    @SETTINGS
    @given(st.one_of(st.fixed_dictionaries({"grace": json_value}).map(orjson.dumps), randoms))
    def rotate(raw: bytes) -> None:
        r = admin.post(f"/admin/keys/{victim}/rotate", content=raw)
        _count("/admin/keys/{id}/rotate", "random", r)
        if r.status_code != 201:
            _openai_error(r, need_param=False)
    rotate()


query_text = st.text(string.ascii_letters + string.digits + "-:.TZ+%&=é ", max_size=24)  # %00 and friends included


@st.composite
def usage_query(draw: Any) -> tuple[str, bool]:
    if draw(st.booleans()):   # a valid query
        day = draw(st.dates(min_value=__import__("datetime").date(2020, 1, 1),
                            max_value=__import__("datetime").date(2030, 1, 1)))
        parts = [f"from={day.isoformat()}", f"to={(day + __import__('datetime').timedelta(days=draw(st.integers(1, 400)))).isoformat()}"]
        parts.append("group_by=" + draw(st.sampled_from(["day", "provider", "model", "user", "application"])))
        return "&".join(draw(st.permutations(parts))), True
    names = st.sampled_from(["from", "to", "group_by", "user_id", "application", "x", "from%00", ""])
    pairs = draw(st.lists(st.tuples(names, query_text), max_size=4))
    return "&".join(f"{k}={v}" for k, v in pairs), False


def test_usage_query_strings(gw: Any) -> None:
    g, _, admin = gw

    @SETTINGS
    @given(usage_query())
    def run(case: tuple[str, bool]) -> None:
        qs, valid = case
        r = admin.get("/v1/usage?" + qs)
        _count("/v1/usage", "valid" if valid else "random", r)
        if valid:
            assert r.status_code == 200, (qs, r.text)
        elif r.status_code != 200:
            _openai_error(r, need_param=False)
    run()


def test_gateway_healthy_after(gw: Any) -> None:
    g, user, _ = gw
    r = user.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert httpx.get(g.url + "/health", timeout=10).json()["status"] == "ok"
