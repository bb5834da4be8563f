"""Waiting on explicit conditions (never on wall-clock guesses), and a process's resident memory."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def wait_for(condition, timeout_s: float = 60.0, poll_s: float = 0.05) -> bool:
    """True as soon as ``condition()`` holds; False when it still does not after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return False


def under_traffic(condition, request: Callable[[int], None], streams: int = 4, timeout_s: float = 120.0) -> float:
    """Keep ``streams`` loops of ``request(i)`` running until ``condition()`` holds; the moment
    it held (AssertionError after ``timeout_s``; a failed request fails the call)."""
    done, deadline = threading.Event(), time.monotonic() + timeout_s

    def traffic(i: int) -> None:
        while not done.is_set() and time.monotonic() < deadline:
            request(i)

    with ThreadPoolExecutor(streams) as pool:
        workers = [pool.submit(traffic, i) for i in range(streams)]
        try:
            while not condition():
                assert time.monotonic() < deadline, "the condition did not hold while requests ran"
                time.sleep(0.05)
            return time.monotonic()
        finally:
            done.set()
            for worker in workers:
                worker.result()


def rss_mb(pid: int) -> float:
    """Resident memory of a live process, in MiB (0 when /proc does not say)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
