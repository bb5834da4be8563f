"""Prometheus metrics: the /metrics HTTP endpoint every service process exposes.

Metrics live in prometheus_client's default registry, which already carries the standard
``process_*``, ``python_gc_*`` and ``python_info`` collectors; one process = one service, so the
default registry is the per-service registry.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client.registry import REGISTRY, CollectorRegistry


def start_metrics_server(port: int, host: str = "127.0.0.1",
                         registry: CollectorRegistry = REGISTRY) -> tuple[int, Callable[[], None]]:
    """Serve ``registry`` at http://host:port/metrics on a daemon thread.

    ``port=0`` binds a free port. Returns the bound port and a blocking stop function that closes
    the socket and joins the thread.
    """
    httpd, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5.0)

    return httpd.server_address[1], stop
