"""ServiceHost: the gRPC server every service process runs.

Lifecycle: ``start()`` binds host:port (port 0 -> a free port), registers the services plus the
standard health and reflection services, starts /metrics, and reports every service NOT_SERVING.
``set_serving()`` flips them to SERVING once the core is ready, writes the ready file and logs one
"serving" line. SIGTERM/SIGINT (or ``stop()``) drain: NOT_SERVING, ``server.stop(grace_s)`` (new
RPCs refused, in-flight ones finish), the ``on_stop`` hook, then the tracer provider is flushed and
the metrics server closed. ``wait()`` returns once the drain is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from cloudmatrix.config import ServerConfig
from cloudmatrix.rpc import tls
from cloudmatrix.rpc.channel import server_options
from cloudmatrix.rpc.requests import ParseRequests
from cloudmatrix.telemetry.metrics import start_metrics_server

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# A health "service" SERVING from the moment the server listens until its drain, whatever the
# process's readiness: a liveness probe asks for it, so that a process loading its model or waiting
# for a die (NOT_SERVING, not ready) is not killed for it.
LIVENESS = "liveness"


@dataclass(frozen=True)
class Registration:
    """One service to host: the generated ``add_XServicer_to_server`` function, the servicer and
    the full proto service name (e.g. ``"cmx.npu.v1.NpuEmulator"``)."""

    add_fn: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str


RegistrationLike = Registration | tuple[Callable[[Any, grpc.aio.Server], None], Any, str]


def as_registration(item: RegistrationLike) -> Registration:
    return item if isinstance(item, Registration) else Registration(*item)


class _Capture:
    """Stands in for a server to catch the handlers a generated add function registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def with_raw_bytes(add_fn: Callable[[Any, grpc.aio.Server], None], *, requests: Sequence[str] = (),
                   responses: Sequence[str] = ()) -> Callable[[Any, grpc.aio.Server], None]:
    """A generated ``add_XServicer_to_server`` whose listed methods take serialized requests
    (bytes) or return serialized responses: for hot paths that read or write their large messages
    on the wire (``cloudmatrix.rpc.protowire``). Clients are unaffected: the bytes on the wire are
    the same protobuf messages."""
    def add(servicer: Any, server: grpc.aio.Server) -> None:
        capture = _Capture()
        add_fn(servicer, capture)
        handlers = {name: h._replace(request_deserializer=None if name in requests else h.request_deserializer,
                                     response_serializer=None if name in responses else h.response_serializer)
                    for name, h in capture.handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
        server.add_registered_method_handlers(capture.service, handlers)
    return add


class ServiceHost:
    """One process's gRPC server with health, reflection, metrics and a graceful drain."""

    def __init__(
        self,
        config: ServerConfig,
        registrations: Sequence[RegistrationLike],
        *,
        service: str,
        tracer_provider: TracerProvider | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        on_stop: Callable[[], Awaitable[None]] | None = None,
        on_drain: Callable[[], Awaitable[None]] | None = None,
    ):
        self.config = config
        self.service = service
        self.registrations = tuple(as_registration(r) for r in registrations)
        self._tracer_provider = tracer_provider
        self._interceptors = list(interceptors)
        self._on_stop = on_stop
        self._on_drain = on_drain
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._port: int | None = None
        self._metrics_port: int | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()

    @property
    def service_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.registrations)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ServiceHost.port is known only after start()")
        return self._port

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port; None when metrics are off (metrics_port = -1)."""
        return self._metrics_port

    @property
    def address(self) -> str:
        return _host_port(self.config.host, self.port)

    async def start(self) -> None:
        """Bind, register everything NOT_SERVING, start serving RPCs and /metrics."""
        c = self.config
        options = server_options(c.max_message_bytes, c.keepalive_s, c.keepalive_timeout_s)
        self._server = grpc.aio.server(
            options=[*options, ("grpc.so_reuseport", 0)],
            interceptors=[ParseRequests(), *self._interceptors],
        )
        await self._register_health()
        for r in self.registrations:
            r.add_fn(r.servicer, self._server)
        reflection.enable_server_reflection(
            [*self.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], self._server)
        self._port = self._bind()
        self._start_metrics()
        await self._server.start()
        await self._health.set(LIVENESS, SERVING)

    async def _register_health(self) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for name in ("", *self.service_names):
            await self._health.set(name, NOT_SERVING)

    def _bind(self) -> int:
        address = _host_port(self.config.host, self.config.port)
        files = tls.files_of(self.config)
        try:
            port = self._server.add_secure_port(address, tls.server_credentials(files)) if files \
                else self._server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"cannot bind gRPC server to {address}: {err}") from err
        if port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        return port

    def _start_metrics(self) -> None:
        if self.config.metrics_port < 0:
            return
        self._metrics_port, self._stop_metrics = start_metrics_server(
            self.config.metrics_port, self.config.host)

    async def set_serving(self) -> None:
        """Report every service SERVING, write the ready file and log the "serving" line."""
        if self._stop_requested.is_set():
            return
        for name in ("", *self.service_names):
            await self._health.set(name, SERVING)
        if self.config.ready_file:
            _write_json_atomically(self.config.ready_file, self.ready_info())
        log.info("serving", extra={"address": self.address, "port": self.port,
                                   "metrics_port": self.metrics_port,
                                   "grpc_services": list(self.service_names)})

    async def set_health(self, serving: bool) -> None:
        """Report every service SERVING or NOT_SERVING (e.g. while a die of the instance is down);
        no-op once a drain began."""
        if self._stop_requested.is_set():
            return
        for name in ("", *self.service_names):
            await self._health.set(name, SERVING if serving else NOT_SERVING)
        log.info("health", extra={"serving": serving})

    def ready_info(self) -> dict[str, Any]:
        """What the ready file holds: {service, pid, host, port, metrics_port}."""
        return {"service": self.service, "pid": os.getpid(), "host": self.config.host,
                "port": self.port, "metrics_port": self.metrics_port}

    def install_signal_handlers(self) -> None:
        """Drain on SIGTERM / SIGINT (call from inside the running loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)

    def request_stop(self, reason: str = "requested") -> None:
        """Begin the drain without waiting for it; later calls are no-ops."""
        if self._drain_task is not None:
            return
        log.info("stopping", extra={"reason": reason, "grace_s": self.config.grace_s})
        self._stop_requested.set()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def stop(self) -> None:
        """Drain now and wait for it (idempotent)."""
        self.request_stop()
        await asyncio.shield(self._drain_task)

    async def wait(self) -> None:
        """Return once a stop was requested and the drain has finished."""
        await self._stop_requested.wait()
        await asyncio.shield(self._drain_task)

    async def _drain(self) -> None:
        try:
            await self._health.enter_graceful_shutdown()
            if self.config.ready_file:
                _remove_if_present(self.config.ready_file)
            if self._on_drain is not None:  # other listeners stop taking new work now too
                await self._on_drain()
            if self._server is not None:
                await self._server.stop(self.config.grace_s)
            if self._on_stop is not None:
                await self._on_stop()
        finally:
            await self._release_telemetry()
        log.info("stopped")

    async def _release_telemetry(self) -> None:
        if self._tracer_provider is not None:
            await asyncio.to_thread(self._tracer_provider.shutdown)
        if self._stop_metrics is not None:
            await asyncio.to_thread(self._stop_metrics)

    async def __aenter__(self) -> ServiceHost:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_json_atomically(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
