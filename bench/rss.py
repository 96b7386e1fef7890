"""This process's memory as the OS counts it (Linux), in GiB, for the benchmarks."""

from __future__ import annotations

import os
import resource


def rss_gib() -> float:
    """The current resident set size (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    """The peak resident set size so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
