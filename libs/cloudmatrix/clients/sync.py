"""Blocking use of any async client: ``SyncClient(NpuClient, address)`` runs the client on its
own event loop in a daemon thread; coroutine methods block until they finish, streaming methods
return plain iterators (leaving one early cancels its call).

    with SyncClient(GatewayClient, "127.0.0.1:50051") as gateway:
        for chunk in gateway.generate(gateway.list_models()[0].id, "The supernode"):
            print(chunk.text, end="")
"""
from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator
from typing import Any

from cloudmatrix.rpc.client import ClientOptions, ServiceClient


class SyncClient:
    def __init__(self, client_cls: type[ServiceClient], address: str, options: ClientOptions | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{client_cls.__name__}-loop",
                                        daemon=True)
        self._thread.start()

        async def make() -> ServiceClient:  # on the loop: grpc.aio channels belong to one
            return client_cls(address, options)

        self.client = self._run(make())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._loop.is_closed():
                raise RuntimeError("this SyncClient is closed")

            async def invoke() -> Any:
                result = attr(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

            result = self._run(invoke())
            return self._iterate(result) if hasattr(result, "__aiter__") else result

        call.__name__, call.__doc__ = name, attr.__doc__
        return call

    def _iterate(self, stream: Any) -> Iterator[Any]:
        iterator = stream.__aiter__()
        finished = False
        try:
            while True:
                try:
                    yield self._run(iterator.__anext__())
                except StopAsyncIteration:
                    finished = True
                    return
        finally:
            if not finished and not self._loop.is_closed():  # left early: end the call now
                self._run(stream.cancel() if hasattr(stream, "cancel") else iterator.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
