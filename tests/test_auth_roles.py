"""Role matrix: every endpoint of the gateway x every kind of caller -> 2xx / 401 / 403, over real HTTP."""
from __future__ import annotations

import datetime as dt

import httpx
import pytest

from support.keys import MASTER, MODEL, admin_create, admin_post, http

ALLOWED = {
    "admin": {"completions", "embeddings", "models", "health", "usage", "admin"},
    "user": {"completions", "embeddings", "models", "health", "usage"},
    "readonly": {"models", "health", "usage"},
}
ACTIONS = {
    ("POST", "/v1/chat/completions"): "completions", ("POST", "/chat/completions"): "completions",
    ("POST", "/v1/completions"): "completions", ("POST", "/completions"): "completions",
    ("POST", "/v1/messages"): "completions",
    ("POST", "/v1/responses"): "completions", ("POST", "/responses"): "completions",
    ("POST", "/v1/responses/input_tokens"): "completions",
    ("POST", "/v1/ensemble/completions"): "completions",
    ("POST", "/v1/embeddings"): "embeddings", ("POST", "/embeddings"): "embeddings",
    ("GET", "/v1/models"): "models", ("GET", "/models"): "models", ("GET", "/v1/models/"): "models",
    ("GET", "/health"): "health",
    ("GET", "/v1/usage"): "usage",
    ("GET", "/admin/keys"): "admin", ("POST", "/admin/keys"): "admin", ("POST", "/admin/keys/"): "admin",
    ("POST", "/v1beta/models/"): "completions", ("POST", "/v1/models/"): "completions",
    ("GET", "/v1beta/models"): "models", ("GET", "/v1beta/models/"): "models",
    ("GET", "/v1/files"): "completions", ("GET", "/v1/batches"): "completions",
    ("GET", "/v1/messages/batches"): "completions",
}
GEMINI = {("POST", "/v1beta/models/"), ("POST", "/v1/models/"), ("GET", "/v1beta/models"), ("GET", "/v1beta/models/")}


def _request(gw, method: str, path: str, key: str | None) -> httpx.Response:
    h = {"authorization": f"Bearer {key}"} if key else {}
    body = None
    if path.endswith("chat/completions"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    elif path == "/v1/ensemble/completions":
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "ensemble_config": {"providers": ["mock"]}}
    elif path.endswith("/completions"):
        body = {"model": MODEL, "prompt": "hi"}
    elif path.endswith("embeddings"):
        body = {"model": MODEL, "input": "hi"}
    elif path.endswith(("/responses", "/input_tokens")):
        body = {"model": MODEL, "input": "hi"}
    elif path == "/v1/messages":
        body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        h["anthropic-version"] = "2023-06-01"
    elif path == "/admin/keys" and method == "POST":
        body = {"role": "readonly", "user_id": "matrix"}
    if (method, path) in GEMINI:  # the Gemini API (api/gemini_routes.py)
        if method == "POST":
            body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
            path += MODEL + ":generateContent"
        elif path.endswith("/"):
            path += MODEL
    elif path == "/v1/models/":
        path = "/v1/models/" + MODEL
    elif path == "/v1/responses/":
        path = "/v1/responses/resp_matrix"
    elif path in ("/v1/files/", "/v1/batches/", "/v1/messages/batches/"):
        path += "matrix_id"
    elif path == "/admin/keys/":
        victim = admin_create(gw, role="readonly", user_id="victim")  # a fresh key to revoke each time
        path = f"/admin/keys/{victim['id']}/revoke"
    return http.request(method, gw.url + path, headers=h, json=body, timeout=10)


@pytest.fixture
def matrix_gw(make_gateway):
    return make_gateway({"auth": {"master_key": MASTER}})


def test_role_matrix(matrix_gw):
    gw = matrix_gw
    keys = {role: admin_create(gw, role=role, user_id=f"u-{role}", application="matrix")["key"]
            for role in ("admin", "user", "readonly")}
    revoked = admin_create(gw, role="user", user_id="gone")
    assert admin_post(gw, f"/admin/keys/{revoked['id']}/revoke").status_code == 200
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).isoformat()
    expired = admin_create(gw, role="admin", user_id="old", expires_at=past)["key"]
    callers = {
        "master": (MASTER, "admin"), "admin": (keys["admin"], "admin"), "user": (keys["user"], "user"),
        "readonly": (keys["readonly"], "readonly"),
        "no key": (None, None), "unknown hx key": ("hx-" + "A" * 43, None), "other key": ("sk-nope", None),
        "revoked": (revoked["key"], None), "expired": (expired, None),
    }
    routes = sorted(set(gw.app.routes) | {(m, p) for m, p, _ in gw.app.prefix_routes})
    checked = 0
    for method, path in routes:
        action = ACTIONS.get((method, path))
        for name, (key, role) in callers.items():
            r = _request(gw, method, path, key)
            where = f"{method} {path} as {name}: {r.status_code} {r.text[:200]}"
            if path in ("/livez", "/readyz"):  # probes: no authentication at all, no secrets (api/probes.py)
                assert r.status_code in (200, 503) and set(r.json()) <= {"status", "checks", "failing"}, where
                continue
            if role is None and key is None and path == "/health":
                assert r.status_code == 200 and set(r.json()) == {"status", "version"}, where  # liveness only
                continue
            if role is None:
                assert r.status_code == 401, where
                err = r.json()["error"]
                if (method, path) in GEMINI:
                    assert err["status"] == "UNAUTHENTICATED", where
                    continue
                assert err["type"] == "authentication_error" if path != "/v1/messages" else True, where
                continue
            if action is None:  # a route this matrix does not know yet: only authentication is asserted
                continue
            if action in ALLOWED[role]:
                assert 200 <= r.status_code < 300, where
            else:
                assert r.status_code == 403, where
                body = r.json()
                msg = body["error"]["message"]
                assert role in msg and action in msg, where
                if (method, path) in GEMINI:
                    assert body["error"]["status"] == "PERMISSION_DENIED", where
                elif path != "/v1/messages":
                    assert body["error"]["type"] == "permission_error", where
            checked += 1
    assert checked >= 13 * 4, checked  # every known endpoint x the four authenticated callers


def test_unknown_key_messages_are_clear_and_never_echo_the_key(matrix_gw):
    gw = matrix_gw
    secret = "hx-" + "Z" * 43
    r = http.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 401 and secret not in r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = http.get(gw.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    # x-api-key works as well as Authorization: Bearer
    k = admin_create(gw, role="readonly", user_id="x")["key"]
    assert http.get(gw.url + "/v1/models", headers={"x-api-key": k}).status_code == 200


def test_no_master_key_local_admin_but_virtual_keys_still_authenticate(make_gateway):
    gw = make_gateway({})
    # without any key the local caller is admin
    r = http.post(gw.url + "/admin/keys", json={"role": "readonly", "user_id": "ro"})
    assert r.status_code == 201, r.text
    ro = r.json()
    # a virtual key keeps its role: readonly may not complete
    r = http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {ro['key']}"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 403 and "readonly" in r.json()["error"]["message"]
    # an unknown key (an SDK's placeholder) is the local admin
    r = http.post(gw.url + "/v1/chat/completions", headers={"authorization": "Bearer unused"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    # a revoked key fails, even here
    assert http.post(gw.url + f"/admin/keys/{ro['id']}/revoke").status_code == 200
    r = http.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {ro['key']}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"
