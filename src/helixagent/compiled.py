"""The hot modules that ``scripts/compile.sh`` compiles to C extensions with mypyc, and the check that a
compiled module still matches its source.

Compiled, these modules run the same code with fewer interpreter instructions (README, "Measured",
rounds 6 and 7). They are chosen as the modules on every request's path that mypyc compiles and that the
whole test suite passes with, compiled (``make test-compiled``): no async generators, no instance
attributes read through the class (a class-level value is a ``ClassVar``), no class defined inside a
function, no function assigned as a method (a compiled function is not bound), annotations that hold at
run time (a compiled function checks them), no variable reused with another type, no reading of
``__slots__``, no test that patches a function the module calls itself, and no class that an interpreted
module subclasses or takes a weak reference to.

Left interpreted, each for a reason a compiled run showed (README, "Measured", rounds 7 and 8):
``canonical`` (``ResponsesRequest`` subclasses ``ChatRequest``: a compiled class refuses interpreted
subclasses; for the same reason the pipeline's ``Stage`` base class is in ``helixagent.stage``);
``routing.queue`` (its ``LeasedStream`` is held by a weak reference, which a compiled class does not
support); ``store.writer`` (compiled, a record test on PostgreSQL crashed the interpreter); ``auth.keys``
(mypyc 2.4 emits C that does not compile for its pydantic model); the routes, providers,
``routing.attempts`` and ``streamed`` (async generators: the stream path).  The router's methods call
the functions of ``routing.plan``, ``ordering``, ``mapping``, ``attempts`` and ``hedge`` (a function
assigned as a method in a class body is not bound once compiled).  A value typed by a
library's stubs is checked too (a ``str``, ``bytes``, ``int``...), so where the stubs are wrong the code
says ``Any``: httptools' URL ``query`` is None without a query string, its stubs say ``bytes`` (compiled,
every request without one was refused as invalid until it said ``Any``).

``make compile`` builds them in place; ``HELIX_COMPILE=1`` builds them into a wheel (setup.py; the
container image's build stage). Python imports ``name.cpython-*.so`` before ``name.py``, so a source
edited after a compile would be silently ignored. The compile writes the SHA-256 of every source it
compiled to :data:`MANIFEST`; :func:`check` (run by ``helixagent serve`` and by the test suite) refuses
to go on when a compiled module's source has changed since, or when one has no manifest entry.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os

MODULES: tuple[str, ...] = (
    "helixagent.api.cycle",
    "helixagent.api.http",
    "helixagent.api.openai_format",
    "helixagent.api.protocol",
    "helixagent.auth.authenticator",
    "helixagent.auth.stage",
    "helixagent.cache.backends",
    "helixagent.cache.key",
    "helixagent.cache.service",
    "helixagent.flags",
    "helixagent.limits.backends",
    "helixagent.limits.limiter",
    "helixagent.limits.stage",
    "helixagent.millis",
    "helixagent.observability.metrics",
    "helixagent.observability.stage",
    "helixagent.observability.window",
    "helixagent.pipeline",
    "helixagent.providers.checks",
    "helixagent.providers.h1",
    "helixagent.routing.costs",
    "helixagent.routing.health",
    "helixagent.routing.mapping",
    "helixagent.routing.ordering",
    "helixagent.routing.priority",
    "helixagent.routing.router",
    "helixagent.store.spool",
    "helixagent.tokens",
)

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(_PKG_DIR, "compiled.json")


class StaleCompiledModule(RuntimeError):
    """A compiled module does not match its source: recompile (``make compile``) or remove the compiled
    files (``make clean-compiled``)."""


def source_path(module: str) -> str:
    """``helixagent.limits.backends`` -> the path of its ``.py`` file."""
    parts = module.split(".")
    return os.path.join(os.path.dirname(_PKG_DIR), *parts) + ".py"


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compiled_modules() -> list[str]:
    """The modules of :data:`MODULES` that import as a compiled extension here (found, not imported)."""
    out = []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            out.append(name)
    return out


def write_manifest() -> None:
    """Record the sources just compiled (scripts/compile.sh, after mypyc)."""
    digests = {name: _digest(source_path(name)) for name in MODULES}
    with open(MANIFEST, "w") as f:
        json.dump(digests, f, indent=1, sort_keys=True)
        f.write("\n")


def check() -> list[str]:
    """The compiled modules in use; raises :class:`StaleCompiledModule` if one no longer matches its
    source (a pure-Python tree returns [] and reads nothing)."""
    names = compiled_modules()
    if not names:
        return names
    try:
        with open(MANIFEST) as f:
            digests = json.load(f)
    except (OSError, ValueError) as exc:
        raise StaleCompiledModule(f"compiled modules {names} but no readable {MANIFEST} ({exc}): "
                                  "run `make compile` or `make clean-compiled`") from None
    stale = [n for n in names if digests.get(n) != _digest(source_path(n))]
    if stale:
        raise StaleCompiledModule(f"{', '.join(stale)}: the source changed since it was compiled (the "
                                  "compiled code would run instead of it): run `make compile` to rebuild "
                                  "or `make clean-compiled` to run the sources")
    return names
