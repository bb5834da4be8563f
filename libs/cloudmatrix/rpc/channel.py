"""Outbound gRPC channels with the suite's message limits, and health probes."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudmatrix.rpc.tls import process_channel_credentials

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
UNREACHABLE = "UNREACHABLE"
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


# A silent peer (a frozen process, a dropped link) is found by HTTP/2 keepalive: a PING after
# KEEPALIVE_S without traffic, the connection (and every call on it, UNAVAILABLE) closed when no ack
# comes within KEEPALIVE_TIMEOUT_S. gRPC times a ping out by grpc.http2.ping_timeout_ms (60 s by
# default); grpc.keepalive_timeout_ms alone does not shorten it.
KEEPALIVE_S = 10.0
KEEPALIVE_TIMEOUT_S = 20.0

# A channel to a peer that is not there (yet) retries its connection with exponential backoff.
# gRPC's defaults (1 s, x1.6, up to 120 s) left a channel that had failed for two minutes finding
# a server started on its port 67 s late; capped at RECONNECT_MAX_S a new or restarted peer is found
# within a few seconds of listening (docs/reliability.md, "Reconnecting").
RECONNECT_INITIAL_S = 0.25
RECONNECT_MAX_S = 2.0


def channel_options(max_message_bytes: int, keepalive_s: float = KEEPALIVE_S,
                    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int]]:
    """Message-size and keepalive options shared by servers and channels so both sides agree
    (``keepalive_s`` 0 = no keepalive pings)."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if keepalive_s > 0:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return options


def reconnect_options(initial_s: float = RECONNECT_INITIAL_S, max_s: float = RECONNECT_MAX_S) -> list[tuple[str, int]]:
    """A client channel's reconnect backoff: from ``initial_s``, growing, never above ``max_s``."""
    return [("grpc.initial_reconnect_backoff_ms", int(initial_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(max_s * 1000))]


def server_options(max_message_bytes: int, keepalive_s: float = KEEPALIVE_S,
                   keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int]]:
    """A server's options: the channels' own (it pings silent clients too), and a ping policy that
    accepts its clients' keepalive pings instead of answering them with GOAWAY."""
    return [*channel_options(max_message_bytes, keepalive_s, keepalive_timeout_s),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0)]


def make_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` ("host:port"); TLS with ``credentials``, or with the
    process's mutual-TLS identity when one is set (``rpc.tls.use_process_tls``).

    Looked up on ``grpc.aio`` at call time, so ``instrument_grpc()`` tracing applies.
    """
    options = [*channel_options(max_message_bytes), *reconnect_options()]
    credentials = credentials if credentials is not None else process_channel_credentials()
    extra = {"interceptors": list(interceptors)} if interceptors else {}
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options, **extra)
    return grpc.aio.insecure_channel(target, options=options, **extra)


async def health_check(target: str, timeout: float = 1.0, service: str = "") -> str:
    """"SERVING", "NOT_SERVING", "UNKNOWN" (no such service / odd answer) or "UNREACHABLE"."""
    async with make_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            return _status_for_error(err.code())
    return _status_name(reply.status)


def make_sync_channel(target: str, options: Sequence[tuple[str, int]] = ()) -> grpc.Channel:
    """A blocking channel, TLS with the process's mutual-TLS identity when one is set."""
    credentials = process_channel_credentials()
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=list(options))
    return grpc.insecure_channel(target, options=list(options))


def health_check_sync(target: str, timeout: float = 1.0, service: str = "") -> str:
    """Blocking ``health_check`` for CLI use (do not call it from a running event loop)."""
    with make_sync_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return _status_for_error(err.code())
    return _status_name(reply.status)


def _status_for_error(code: grpc.StatusCode) -> str:
    return UNREACHABLE if code in _UNREACHABLE_CODES else "UNKNOWN"


def _status_name(status: int) -> str:
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return name if name in ("SERVING", "NOT_SERVING") else "UNKNOWN"
