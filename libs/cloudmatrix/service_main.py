"""run_service: the main() every service process shares.

    def main() -> None:
        run_service("npu", NpuConfig, build)   # never returns; exits 0 after a clean drain

Config comes from ``--config FILE``, an entry of a topology file (``--topology FILE --entry NAME
--index N``: that entry's ``config`` file and ``set`` / ``set_each``, as `cmx up` would give them;
how a Kubernetes container reads its ConfigMap), the environment (``CMX_<NAME>__SECTION__FIELD``,
e.g. ``CMX_NPU__SERVER__PORT=5001``) and repeated ``--set section.field=value`` flags, in
increasing priority. OpenTelemetry's ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is the OTLP endpoint
when ``server.otlp_endpoint`` is not set. A bad value exits 2 with one ``config error:
<dotted.field>: ...`` line on stderr. This is the only place that reads ``os.environ``; everything
below receives the frozen config.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from cloudmatrix.allocator import tune_allocator
from cloudmatrix.config import ConfigError, ServerConfig, load_config
from cloudmatrix.launcher.topology import entry_settings
from cloudmatrix.rpc import tls
from cloudmatrix.rpc.server import RegistrationLike, ServiceHost
from cloudmatrix.rpc.tls import use_process_tls
from cloudmatrix.telemetry.logging import setup_logging
from cloudmatrix.telemetry.tracing import instrument_grpc, setup_tracing

log = logging.getLogger(__name__)

OnReady = Callable[[ServiceHost], Awaitable[None]]
OnStop = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ServiceParts:
    """What a service's ``build(config)`` returns (a ``(registrations, on_ready)`` tuple works too).

    ``on_ready(host)`` runs after the server is bound (``host.port`` is known) and before the
    services flip to SERVING; ``on_drain()`` when the drain begins (stop accepting new work on
    other listeners; in-flight work goes on); ``on_stop()`` after the drain, before telemetry is
    flushed.
    """

    registrations: Sequence[RegistrationLike]
    on_ready: OnReady | None = None
    on_stop: OnStop | None = None
    on_drain: OnStop | None = None


Build = Callable[[Any], Awaitable["ServiceParts | tuple[Sequence[RegistrationLike], OnReady | None]"]]


def env_prefix(name: str) -> str:
    """``"npu_emulator"`` -> ``"CMX_NPU_EMULATOR"``."""
    return "CMX_" + re.sub(r"[^0-9A-Za-z]", "_", name).upper()


def run_service(name: str, config_cls: type, build: Build, argv: Sequence[str] | None = None) -> NoReturn:
    """Load config, set up logging/tracing, serve until SIGTERM/SIGINT, drain, exit."""
    args = _parse_args(name, sys.argv[1:] if argv is None else argv)
    config = _load_or_exit(name, config_cls, args)
    server: ServerConfig = config.server
    service = server.service_name or name
    tune_allocator(server.malloc_retain_bytes)
    _limit_torch_threads()
    setup_logging(service, server.log_level, server.log_format)
    use_process_tls(tls.files_of(server))  # outbound channels present this process's certificate
    otlp_endpoint = server.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") \
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    provider = setup_tracing(name, instance_id=service, otlp_endpoint=otlp_endpoint,
                             span_file=server.span_file(service, os.getpid()),
                             span_file_max_bytes=server.span_file_max_bytes, span_file_backups=server.span_file_backups)
    instrument_grpc()
    try:
        code = asyncio.run(_serve(service, config, build, provider))
    except Exception:  # logged as one structured line, then a non-zero exit
        log.exception("service failed")
        code = 1
    raise SystemExit(code)


def _parse_args(name: str, argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=name, description=f"CloudMatrix-Infer {name} service")
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument("--topology", metavar="FILE",
                        help="take settings from an entry of this topology file (a Kubernetes ConfigMap)")
    parser.add_argument("--entry", help="the topology entry (default: the service's name)")
    parser.add_argument("--index", type=int, default=0,
                        help="this process's index in its entry ({index} in set_each; a pod's ordinal)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one field, e.g. server.port=5001")
    return parser.parse_args(list(argv))


def _load_or_exit(name: str, config_cls: type, args: argparse.Namespace) -> Any:
    path, base = args.config, ()
    if args.topology:
        try:
            entry_config, base = entry_settings(args.topology, args.entry or name, args.index, name)
        except (OSError, ValueError) as err:
            print(f"config error: topology: {err}", file=sys.stderr)
            raise SystemExit(2) from err
        path = args.config or entry_config
    try:
        config = load_config(config_cls, path=path, env=os.environ, overrides=args.overrides,
                             env_prefix=env_prefix(name), base=base)
    except ConfigError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from err
    if not isinstance(getattr(config, "server", None), ServerConfig):
        raise TypeError(f"{config_cls.__name__} needs a field `server: ServerConfig`")
    return config


def _limit_torch_threads() -> None:
    """One intra-op thread per process: each service process is one die / one worker."""
    if importlib.util.find_spec("torch") is None:
        return
    import torch

    torch.set_num_threads(1)


async def _serve(service: str, config: Any, build: Build, provider: Any) -> int:
    parts = _as_parts(await build(config))
    host = ServiceHost(config.server, parts.registrations, service=service,
                       tracer_provider=provider, on_stop=parts.on_stop, on_drain=parts.on_drain)
    async with host:
        host.install_signal_handlers()
        if parts.on_ready is not None:
            await parts.on_ready(host)
        freeze_startup_objects()
        await host.set_serving()
        await host.wait()
    return 0


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, the model, the servicers: about 190,000
    objects in every service process) out of the cyclic collector's reach. Without this, each full
    collection walks them all: about 0.2 s of CPU (a pause of the event loop) in the gateway, prefill
    and decode services at 32 concurrent requests. Garbage made later is collected as before."""
    gc.collect()
    gc.freeze()


def _as_parts(built: Any) -> ServiceParts:
    if isinstance(built, ServiceParts):
        return built
    registrations, on_ready = built
    return ServiceParts(registrations=registrations, on_ready=on_ready)
