"""Waiting on explicit conditions (never on wall-clock guesses), and a process's resident memory."""
from __future__ import annotations

import time
from pathlib import Path


def wait_for(condition, timeout_s: float = 60.0, poll_s: float = 0.05) -> bool:
    """True as soon as ``condition()`` holds; False when it still does not after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return False


def rss_mb(pid: int) -> float:
    """Resident memory of a live process, in MiB (0 when /proc does not say)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
