"""The project's PEP 517 build backend: setuptools', plus mypy (mypyc) as a build requirement of a wheel
when HELIX_COMPILE=1 -- then setup.py compiles the hot modules into the wheel (README, "Compiled hot
modules").  Without it, exactly setuptools' backend."""
from __future__ import annotations

import os
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every hook not overridden here is setuptools' own

MYPYC = "mypy>=2.4,<2.5"  # the mypy of the test extras (pyproject.toml), whose mypyc the CI runs test


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    if os.environ.get("HELIX_COMPILE") != "1":
        return _setuptools.get_requires_for_build_wheel(config_settings)
    # setuptools runs setup.py to answer this, before mypy is installed: the plain package's answer, plus mypy
    os.environ["HELIX_COMPILE"] = "0"
    try:
        base = _setuptools.get_requires_for_build_wheel(config_settings)
    finally:
        os.environ["HELIX_COMPILE"] = "1"
    return [*base, MYPYC]
