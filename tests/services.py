"""Start real service processes for tests (via the launcher's own spawn/wait), always stopped."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from cloudmatrix.clients import DecodeClient
from cloudmatrix.launcher.processes import ProcessRecord, spawn, stop_all, wait_healthy
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.rpc.channel import health_check_sync


@contextlib.contextmanager
def running_service(service: str, run_dir: Path, *overrides: str, name: str | None = None):
    """Yield the ProcessRecord of a SERVING process; SIGTERM (then SIGKILL) it on exit."""
    with running_services(run_dir, [(name or service, service, overrides)]) as records:
        yield next(iter(records.values()))


def log_text(record: ProcessRecord) -> str:
    return Path(record.log).read_text()


def decode_running(address: str) -> int:
    """The requests running on the decode instance at ``address``, as its GetLoad says."""
    async def load():
        async with DecodeClient(address) as client:
            return (await client.load(deadline_s=5.0)).running

    return asyncio.run(load())


@contextlib.contextmanager
def running_services(run_dir: Path, specs: list[tuple[str, str, tuple[str, ...]]]):
    """Start several (name, service, overrides) processes at once; yield their records by name."""
    started = []
    try:
        for name, service, overrides in specs:
            started.append(spawn(ProcessSpec(name, service, "127.0.0.1", 0, None, tuple(overrides)), run_dir))
        wait_healthy(started, health_check_sync, timeout_s=90)
        yield {record.name: record for _, record in started}
    finally:
        stop_all([r for _, r in started], grace_s=10)
        for proc, _ in started:
            proc.wait(timeout=10)
