import pytest

from helixagent.config import ConfigError, interpolate, load_config_text, masked_dict, parse_duration


def test_interpolation_with_defaults(monkeypatch):
    monkeypatch.setenv("HX_A", "alpha")
    monkeypatch.delenv("HX_MISSING", raising=False)
    assert interpolate("${HX_A}-${HX_MISSING:-dflt}-${HX_MISSING}") == "alpha-dflt-"


def test_seed_keys_load(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret-value-1234")
    cfg = load_config_text("""
environment: production
providers:
  - name: claude
    priority: 1
    fallback_to: [openai, deepseek]
    timeout_ms: 30000
  - name: openai
    priority: 2
    max_cost_per_token: 0.000002
  - name: deepseek
    priority: 3
    max_cost_per_request: 0.01
http:
  max_idle_conns: 100
  max_conns_per_host: 10
  idle_conn_timeout: 90s
logging:
  level: info
  format: json
  fields: [timestamp, method, path, ip, user_agent, response_time, status_code]
cache: {enabled: true, type: redis, ttl: 3600, max_size: 10000}
redis: {url: "redis://127.0.0.1:6379/0"}
rate_limits:
  ip: {requests_per_minute: 60, burst_size: 10}
  api_key: {requests_per_minute: 1000, tokens_per_minute: 10000}
  user: {tokens_per_minute: 10000, tokens_per_day: 100000}
  application: {tokens_per_month: 1000000}
encryption: {enabled: true, algorithm: aes-256-gcm, key_rotation_days: 30}
""")
    claude = cfg.provider("claude")
    assert claude.type == "anthropic" and claude.base_url == "https://api.anthropic.com"
    assert claude.api_key == "sk-ant-secret-value-1234"
    assert cfg.provider("openai").base_url == "https://api.openai.com/v1"
    assert cfg.provider("deepseek").type == "deepseek"
    assert cfg.http.idle_conn_timeout == 90.0
    assert cfg.cache.redis_url == "redis://127.0.0.1:6379/0"
    masked = masked_dict(cfg)
    assert "sk-ant-secret-value-1234" not in repr(masked)


@pytest.mark.parametrize("text,needle", [
    ("providers:\n  - name: claude\n    priorty: 1\n", "providers[0].priorty: unknown key"),
    ("providers:\n  - name: openai\n    timeout_ms: -5\n", "providers[0].timeout_ms"),
    ("providers:\n  - name: openai\n    fallback_to: [nope]\n", "'nope' is not a configured provider"),
    ("providers:\n  - name: weird\n", "cannot infer 'type'"),
    ("logging: {format: xml}\n", "logging.format"),
    ("bogus: 1\n", "bogus: unknown key"),
    ("http: {idle_conn_timeout: soon}\n", "not a duration"),
    ("providers: [\n", "not valid YAML"),
    ("providers:\n  - name: a\n    type: openai\n  - name: a\n    type: openai\n", "duplicate provider name"),
])
def test_errors_name_the_key(text, needle):
    with pytest.raises(ConfigError) as ei:
        load_config_text(text, "f.yaml")
    assert needle in str(ei.value)


def test_durations():
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300
    assert parse_duration("24h") == 86400
    assert parse_duration(12) == 12.0


def test_shipped_configs_are_valid(monkeypatch):
    from pathlib import Path
    from helixagent.config import load_config
    root = Path(__file__).resolve().parents[1]
    for name in ("development.yaml", "production.yaml"):
        load_config(root / "configs" / name)
