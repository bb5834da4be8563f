"""One client per shard (made by the factory the pool passes in: ``KvShardClient``, in
shard_client.py, which imports this module), and ``call``: an RPC with a deadline, retries and
liveness accounting."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import grpc

from cloudmatrix.kvcache.health import ShardHealth
from cloudmatrix.rpc.client import ClientOptions
from cloudmatrix.rpc.errors import PeerUnavailable

if TYPE_CHECKING:
    from cloudmatrix.kvcache.shard_client import KvShardClient

T = TypeVar("T")
Attempt = Callable[["KvShardClient", float], Awaitable[T]]  # (shard client, timeout_s) -> result; one RPC

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CALL_ERRORS = (grpc.aio.AioRpcError, PeerUnavailable)  # what ``call`` raises for a failed RPC


def describe(err: BaseException) -> str:
    """"UNAVAILABLE: <details>" for a failed RPC, the message for anything else."""
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details() or ''}".rstrip(": ")
    return str(err) or type(err).__name__


class ShardConnections:
    """Lazily made clients of the shards, and the retry loop every RPC goes through.

    An attempt that fails UNAVAILABLE or DEADLINE_EXCEEDED counts against the shard's health and
    is retried up to ``retries`` times after ``backoff_s``, 2x, 4x...; retries stop early when the
    failure marks the shard down. Other status codes are the shard's answer: raised at once.
    A call to a shard already marked down raises ``PeerUnavailable`` without touching the wire.
    """

    def __init__(self, *, make_client: Callable[[str, ClientOptions], KvShardClient], deadline_s: float,
                 retries: int, backoff_s: float, max_message_bytes: int, down_after: int,
                 probe_interval_s: float) -> None:
        if deadline_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"need deadline_s > 0, retries >= 0, backoff_s >= 0; got {deadline_s}, "
                             f"{retries}, {backoff_s}")
        self.make_client = make_client
        self.deadline_s = deadline_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_message_bytes = max_message_bytes
        self.health = ShardHealth(down_after=down_after, probe_interval_s=probe_interval_s,
                                  probe_timeout_s=min(deadline_s, probe_interval_s), on_up=self._back_up)
        self.on_rejoin: Callable[[str], None] | None = None  # after a down shard is SERVING again
        self._clients: dict[str, KvShardClient] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def client(self, shard: str) -> KvShardClient:
        """The shard's client (retries are this class's business, so the client makes none)."""
        client = self._clients.get(shard)
        if client is None:
            options = ClientOptions(deadline_s=self.deadline_s, retries=0, max_message_bytes=self.max_message_bytes)
            client = self._clients[shard] = self.make_client(shard, options)
        return client

    def _back_up(self, shard: str) -> None:
        self.reset(shard)
        if self.on_rejoin is not None:
            self.on_rejoin(shard)

    def reset(self, shard: str) -> None:
        """Drop the shard's channel (closed in the background); the next call dials afresh.

        Called when a down shard is SERVING again, so no reconnect backoff left over from its
        outage delays the first call.
        """
        client = self._clients.pop(shard, None)
        if client is not None:  # calls in flight on it finish (or fail) as they would have
            task = asyncio.create_task(client.close(grace_s=self.deadline_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def call(self, shard: str, attempt: Attempt[T], deadline_s: float | None = None) -> T:
        """Run ``attempt(client, timeout_s)`` against ``shard`` with retries; see the class doc."""
        timeout_s = deadline_s or self.deadline_s
        for n in range(self.retries + 1):
            if not self.health.is_up(shard):
                raise PeerUnavailable(f"kvcache shard {shard} is marked down")
            try:
                result = await attempt(self.client(shard), timeout_s)
            except grpc.aio.AioRpcError as err:
                if err.code() not in TRANSIENT_CODES:
                    self.health.record_success(shard)
                    raise
                marked_down = self.health.record_failure(shard)
                if marked_down or n == self.retries:
                    raise
                await asyncio.sleep(self.backoff_s * 2**n)
            else:
                self.health.record_success(shard)
                return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def close(self) -> None:
        await self.health.close()
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), *self._closing, return_exceptions=True)
