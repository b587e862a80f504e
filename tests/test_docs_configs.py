"""Every configuration example in the README and docs/*.md is a config the gateway accepts.

The rule: every ```yaml block in README.md and docs/*.md is a complete config file on its own, loaded
with ``load_config_text`` and checked with ``preflight.check_runtime`` (the checks ``config check`` and
``serve`` run), with the environment variables a deployment sets (vendor keys, master key, encryption
keys).  A block that is deliberately not a whole config is marked by the line ``<!-- config-fragment -->``
right before its fence; it must still be valid YAML.  The shipped configs/*.yaml files are checked too.
"""
from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest
import yaml

from helixagent.config import load_config, load_config_text
from helixagent.preflight import check_runtime

ROOT = Path(__file__).resolve().parents[1]
FRAGMENT = "<!-- config-fragment -->"
_FENCE = re.compile(r"^```yaml\s*$")


def yaml_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, is_fragment) of each ```yaml block."""
    out = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            start = i
            fragment = i > 0 and lines[i - 1].strip() == FRAGMENT
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((start + 1, "\n".join(body) + "\n", fragment))
        i += 1
    return out


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(f"{p.relative_to(ROOT)}:{n}", text, frag) for p in DOCS for n, text, frag in yaml_blocks(p)]


@pytest.fixture
def deployment_env(monkeypatch, tmp_path):
    """What an operator exports before starting the gateway (fake values, never used on the network)."""
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DEEPSEEK_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.setenv(var, "sk-test-" + var.lower())
    monkeypatch.setenv("HELIXAGENT_API_KEY", "hx-master-test-key")
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", "k1:" + base64.b64encode(b"k" * 32).decode())
    for var in ("HELIXAGENT_CONFIG", "HELIXAGENT_REDIS_URL", "HELIXAGENT_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # relative paths (./spool, ./helixagent.db) land in the test's directory
    return tmp_path


def test_the_docs_have_config_examples():
    # the README's Configuration section and at least one block in most docs: a broken extractor fails here
    names = {b[0].split(":")[0] for b in BLOCKS}
    assert "README.md" in names and len(BLOCKS) >= 10, names


@pytest.mark.parametrize("where,text,fragment", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_doc_config_block_is_accepted(where, text, fragment, deployment_env):
    if fragment:
        assert yaml.safe_load(text) is not None, f"{where}: empty fragment"
        return
    cfg = load_config_text(text, where)
    problems = check_runtime(cfg)
    assert problems == [], f"{where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_config_files_are_accepted(name, deployment_env, monkeypatch):
    path = ROOT / "configs" / name
    cfg = load_config(str(path))
    # the production example writes its spool under /var/lib/helixagent; point that check at the tmp dir
    cfg.database.spool_dir = str(deployment_env / "spool")
    assert check_runtime(cfg) == []


def test_fragment_marker_is_recognised(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("a\n```yaml\nenvironment: dev\n```\n" + FRAGMENT + "\n```yaml\nfoo: 1\n```\n")
    assert [(n, f) for n, _, f in yaml_blocks(md)] == [(2, False), (6, True)]
    assert os.path.exists(md)
