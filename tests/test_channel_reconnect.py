"""Channels find a peer that starts (or restarts) after them: every channel the suite makes
reconnects with a capped backoff (rpc.channel.reconnect_options; the speed is measured in
docs/reliability.md, "Reconnecting"), and a channel that failed against an empty port serves
once a server listens there."""
from __future__ import annotations

import asyncio
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloudmatrix.rpc import channel as channels


def test_every_channel_the_suite_makes_caps_its_reconnect_backoff(monkeypatch):
    seen = {}

    def capture(target, options=None, **kwargs):
        seen.update(dict(options))
        return "channel"

    monkeypatch.setattr(grpc.aio, "insecure_channel", capture)
    assert channels.make_channel("127.0.0.1:1") == "channel"
    assert seen["grpc.max_reconnect_backoff_ms"] == int(channels.RECONNECT_MAX_S * 1000) <= 5000
    assert seen["grpc.initial_reconnect_backoff_ms"] == seen["grpc.min_reconnect_backoff_ms"] <= 1000
    assert seen["grpc.max_send_message_length"] == channels.DEFAULT_MAX_MESSAGE_BYTES  # the rest kept


def test_a_channel_that_failed_serves_once_a_server_listens_on_its_port():
    async def scenario() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        async with channels.make_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(3):  # nobody there: the channel fails and backs off
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                except grpc.aio.AioRpcError as err:
                    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            try:  # the same channel, waiting for its next attempt (bounded: the test's only wait)
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True)
            finally:
                await server.stop(None)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    assert asyncio.run(scenario()) == "SERVING"
