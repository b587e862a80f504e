"""Process-level memory settings of ``helixagent serve``.

An allocator that asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``, as mimalloc in
native extensions does) keeps whole 2 MiB pages resident for a few KB in use: 8 MB of RSS after start-up
were measured that way.  ``PR_SET_THP_DISABLE`` turns huge pages off for this process and the
workers it forks; the kernel then backs those segments with 4 KiB pages, touched as used.  It changes
memory only (no measurable CPU per request in bench/perf_bench.py); where the call is unavailable (not
Linux, no libc symbol, an old kernel) the process runs as before.
"""
from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger("helixagent")

PR_SET_THP_DISABLE = 41   # <linux/prctl.h>


def disable_huge_pages() -> bool:
    """Call before the HTTP client allocates; True if the kernel accepted it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    if prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_THP_DISABLE) refused: errno %d", ctypes.get_errno())
        return False
    return True
