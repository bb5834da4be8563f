"""KV blocks as the KV-cache pool holds them (each a serialized ``cmx.common.v1.Tensor``), read back
as tensors."""
from __future__ import annotations

import torch

from cloudmatrix.rpc.tensor_codec import decode_tensor
from cmx.common.v1 import common_pb2


async def leading_blocks(pool, keys: list[bytes], release=None) -> list[torch.Tensor]:
    """KV [layers, n, C+R] of the leading run of ``keys`` the pool still holds: a block evicted
    since it was written ends the run (what follows it is recomputed). ``release``: a lease the
    pool ends once it has read them."""
    fetched = await pool.get_blocks(list(keys), release)
    blocks = []
    for key in keys:
        if fetched.get(key) is None:
            break
        blocks.append(decode_tensor(common_pb2.Tensor.FromString(fetched[key].data), "kv"))
    return blocks
