#!/usr/bin/env python3
"""HelixAgent abuse benchmark (issue 12): promises under load and attack, bounded in count and time, loopback
only.  Each section lives in its own module and starts its own gateway processes:

  rejected   bench/abuse_rejected.py  RSS before/after 100k requests rejected by authentication (and 1 MB bodies)
  admission  bench/abuse_admission.py admitted vs allowed at 1,000 concurrent requests, one and three instances
             on one Redis
  headers    bench/abuse_server.py    RSS under 40 connections sending 20 MB of unterminated headers
  slowloris  bench/abuse_server.py    a second client's p50/p99 during a slowloris of 200 connections
  protocol   bench/abuse_server.py    CPU per request of the hardened HTTP protocol vs uvicorn's own

Usage: python bench/abuse_bench.py --section NAME [section options...]   (``--section all``: every section
with its defaults; ``python bench/abuse_<name>.py --help`` lists a section's options)
"""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = {"rejected": "abuse_rejected.py", "admission": "abuse_admission.py", "headers": "abuse_server.py",
            "slowloris": "abuse_server.py", "protocol": "abuse_server.py"}


def main(argv: list[str]) -> int:
    section = "all"
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--section":
            section = next(it, "all")
        elif a.startswith("--section="):
            section = a.split("=", 1)[1]
        else:
            rest.append(a)
    if section in ("-h", "--help") or "-h" in rest or "--help" in rest and section == "all":
        print(__doc__)
        return 0
    names = list(SECTIONS) if section == "all" else [section]
    for name in names:
        if name not in SECTIONS:
            print(f"unknown section {name!r}; one of: all, {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
        args = [sys.executable, os.path.join(HERE, SECTIONS[name]), "--section", name]
        rc = subprocess.call(args + (rest if section != "all" else []))
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
