"""Client library of the EMS KV cache pool: consistent-hash placement, replication, blobs.

``KvPoolClient`` is the entry point (client.py); ``HashRing`` is the placement it uses (ring.py).
"""
from cloudmatrix.kvcache.blocks import (
    BlobPutResult,
    Block,
    DeleteResult,
    FetchedBlock,
    Lease,
    PutResult,
)
from cloudmatrix.kvcache.client import KvPoolClient
from cloudmatrix.kvcache.ring import HashRing, ring_point

__all__ = [
    "BlobPutResult",
    "Block",
    "DeleteResult",
    "FetchedBlock",
    "HashRing",
    "KvPoolClient",
    "Lease",
    "PutResult",
    "ring_point",
]
