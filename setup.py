"""Only for HELIX_COMPILE=1 (the container image's build stage): the hot modules listed in
src/helixagent/compiled.py compiled into the wheel with mypyc, with their source manifest.  Everything
else about the package is in pyproject.toml."""
from __future__ import annotations

import os
import sys

from setuptools import setup

ext_modules = []
if os.environ.get("HELIX_COMPILE") == "1":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from mypyc.build import mypycify

    from helixagent import compiled

    ext_modules = mypycify([os.path.relpath(compiled.source_path(m)) for m in compiled.MODULES])
    compiled.write_manifest()  # src/helixagent/compiled.json, into the wheel as package data

setup(ext_modules=ext_modules)
