"""prometheus_client's multiprocess mode (several ``serve`` workers): where its files live, whether it is on,
one scrape over every worker's files, and the clean-up of workers that died."""
from __future__ import annotations

import glob
import os
import re

from prometheus_client import CollectorRegistry, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


def multiprocess_active() -> bool:
    """prometheus_client picks its value class when first imported: both must agree."""
    from prometheus_client import values
    return multiprocess_dir() is not None and "Mmaped" in getattr(values.ValueClass, "__name__", "")


def scrape_multiprocess(path: str) -> bytes:
    from prometheus_client import multiprocess
    reap_dead_workers(path)
    reg = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(reg, path=path)
    return generate_latest(reg)


_LIVE_RE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")


def reap_dead_workers(path: str) -> None:
    """Drop the live gauges of worker processes that died without cleaning up (a crash, a kill -9)."""
    from prometheus_client import multiprocess
    seen: set[int] = set()
    for f in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        m = _LIVE_RE.search(f)
        if not m:
            continue
        pid = int(m.group(1))
        if pid in seen:
            continue
        seen.add(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            pass


def prepare_multiprocess_dir(path: str) -> None:
    """Empty a multiprocess directory before the workers start (stale files would be added up)."""
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "*.db")):
        try:
            os.remove(f)
        except OSError:
            pass
