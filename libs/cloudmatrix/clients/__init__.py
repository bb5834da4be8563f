"""Typed clients of every service: take and return dataclasses and tensors, put a deadline on
every call, retry idempotent calls that never ran (UNAVAILABLE), carry the caller's trace
context, and raise ``CallError`` (a ``grpc.aio.AioRpcError`` that is also the house exception
of its kind). The services call each other through these too. docs/clients.md has an example
per service; ``SyncClient`` makes any of them blocking.
"""
from cloudmatrix.clients.fabric import FabricClient, FabricStats, LinkStats
from cloudmatrix.clients.gateway import GatewayClient
from cloudmatrix.clients.instances import DecodeClient, DecodeStream, PrefillClient
from cloudmatrix.clients.npu import LoadedModel, NpuClient
from cloudmatrix.clients.sync import SyncClient
from cloudmatrix.clients.types import (
    DecodeStep,
    DieInfo,
    GenerateChunk,
    InstanceLoad,
    ModelCard,
    PrefillResult,
    Sampling,
    Timing,
)
from cloudmatrix.kvcache.client import KvPoolClient
from cloudmatrix.kvcache.shard_client import KeyOutcome, KvShardClient, ShardLease
from cloudmatrix.rpc.client import (
    CallError,
    ClientOptions,
    DeadlineExceeded,
    Exhausted,
    InvalidArgument,
    ServiceClient,
    Unavailable,
)
from cloudmatrix.sampling_params import FinishReason, SamplingParams

__all__ = [
    "CallError", "ClientOptions", "DeadlineExceeded", "DecodeClient", "DecodeStep", "DecodeStream", "DieInfo",
    "Exhausted", "FabricClient", "FabricStats", "FinishReason", "GatewayClient", "GenerateChunk", "InstanceLoad", "InvalidArgument",
    "KeyOutcome", "KvPoolClient", "KvShardClient", "LinkStats", "LoadedModel", "ModelCard", "NpuClient",
    "PrefillClient", "PrefillResult", "Sampling", "SamplingParams", "ServiceClient", "ShardLease", "SyncClient", "Timing",
    "Unavailable",
]
