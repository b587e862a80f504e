"""The compiled hot modules (helixagent/compiled.py, scripts/compile.sh): a compiled module whose source
changed since it was compiled is refused -- by the check and by ``helixagent serve`` -- instead of the
old compiled code silently running; the listed modules are ones mypyc can compile.  The whole suite runs
against the compiled modules in ``make test-compiled`` (CI), where conftest insists they all are."""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from helixagent import cli, compiled


def test_check_reports_what_is_in_use() -> None:
    assert compiled.check() == compiled.compiled_modules()


def _manifest(tmp_path: Path, monkeypatch: Any, digests: dict[str, str] | None) -> None:
    path = tmp_path / "compiled.json"
    if digests is not None:
        path.write_text(json.dumps(digests))
    monkeypatch.setattr(compiled, "MANIFEST", str(path))
    monkeypatch.setattr(compiled, "compiled_modules", lambda: ["helixagent.millis"])


def test_a_compiled_module_older_than_its_source_is_refused(tmp_path: Path, monkeypatch: Any) -> None:
    real = compiled._digest(compiled.source_path("helixagent.millis"))
    _manifest(tmp_path, monkeypatch, {"helixagent.millis": real})
    assert compiled.check() == ["helixagent.millis"]
    _manifest(tmp_path, monkeypatch, {"helixagent.millis": "0" * 64})   # the source was edited since
    with pytest.raises(compiled.StaleCompiledModule, match="helixagent.millis: the source changed"):
        compiled.check()
    _manifest(tmp_path, monkeypatch, {})                                 # compiled, but never recorded
    with pytest.raises(compiled.StaleCompiledModule):
        compiled.check()
    (tmp_path / "compiled.json").unlink()
    _manifest(tmp_path, monkeypatch, None)                               # no manifest at all
    with pytest.raises(compiled.StaleCompiledModule, match="no readable"):
        compiled.check()


def test_serve_refuses_to_start_on_a_stale_compiled_module(tmp_path: Path, monkeypatch: Any,
                                                            capsys: Any) -> None:
    from helixagent.api import server
    _manifest(tmp_path, monkeypatch, {"helixagent.millis": "0" * 64})

    def must_not_serve(*a: Any, **k: Any) -> int:
        raise AssertionError("served with a stale compiled module")
    monkeypatch.setattr(server, "serve", must_not_serve)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", "--port", "0"]) == 2
    assert "helixagent.millis: the source changed since it was compiled" in capsys.readouterr().err


def test_the_listed_modules_are_sources_mypyc_compiles() -> None:
    assert len(set(compiled.MODULES)) == len(compiled.MODULES)
    for name in compiled.MODULES:
        path = Path(compiled.source_path(name))
        assert path.is_file(), name
        # mypyc cannot compile an async generator (an `async def` that yields)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AsyncFunctionDef):
                assert not any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(node)), \
                    f"{name}.{node.name} is an async generator"
