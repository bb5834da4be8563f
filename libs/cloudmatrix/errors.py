"""The house exceptions every layer raises, free of gRPC and HTTP (rpc/errors.py and the gateway's
HTTP layer turn them into statuses, by one table). Anything else that escapes a request is a bug:
logged, and answered INTERNAL / 500.

- ``FieldError``: the request is wrong; ``field`` names what to change (INVALID_ARGUMENT, 400);
  ``UnknownModel`` is one, for the ``model`` field.
- ``ResourceExhausted``: the request is fine but cannot be served now; retry later.
- ``PeerUnavailable``: a service this request needs is down or unreachable.
"""
from __future__ import annotations


class FieldError(ValueError):
    """Bad input. ``field`` is the request field to change (``"max_tokens"``, ``"kv.namespace"``);
    the message starts with it, as every INVALID_ARGUMENT and 400 of the project does."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownModel(FieldError):
    """The request names a model this server does not serve."""

    def __init__(self, message: str) -> None:
        super().__init__("model", message)


class ResourceExhausted(Exception):
    """The request is fine but cannot be served now (queue full, no KV blocks); retry later."""


class PeerUnavailable(Exception):
    """A peer service this request needs is down or unreachable."""


class InternalError(RuntimeError):
    """A request failed on a bug of ours (logged where it happened); answered INTERNAL / 500."""
