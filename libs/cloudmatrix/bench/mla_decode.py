"""One MLA decode step over a long context: the paged pool with absorbed attention versus the
model's dense cache with per-step key/value expansion (small preset's attention dims)."""
from __future__ import annotations

import torch

from cloudmatrix.bench.timing import time_interleaved
from cloudmatrix.kv.block_pool import PagedLatentPool, PoolShape
from cloudmatrix.kv.paged_view import PagedBatch, PagedKVView
from cloudmatrix.model.attention import AttentionOptions, LatentKVCache, MLAttention
from cloudmatrix.model.presets import PRESETS

BLOCK_SIZE = 128


def _layer(absorb: str) -> MLAttention:
    torch.manual_seed(0)
    layer = MLAttention(PRESETS["small"], AttentionOptions(absorb=absorb)).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return layer


def bench_mla_decode(batch: int, context: int, repeats: int) -> dict:
    cfg = PRESETS["small"]
    gen = torch.Generator().manual_seed(2)
    latent = torch.randn(batch, context, cfg.kv_lora_rank, generator=gen)
    k_rope = torch.randn(batch, context, cfg.qk_rope_head_dim, generator=gen)
    x = torch.randn(batch, 1, cfg.hidden_size, generator=gen)
    packed = x.view(1, batch, cfg.hidden_size)  # the paged path takes the batch packed
    positions = torch.full((batch, 1), context)
    blocks_per_seq = (context + 1 + BLOCK_SIZE - 1) // BLOCK_SIZE
    pool = PagedLatentPool(PoolShape(1, batch * blocks_per_seq, BLOCK_SIZE, cfg.kv_lora_rank, cfg.qk_rope_head_dim))
    tables = [pool.allocator.allocate(blocks_per_seq) for _ in range(batch)]
    for b, table in enumerate(tables):
        pool.write(0, pool.slots(table, 0, context), latent[b], k_rope[b])
    step = PagedBatch(tables, cached=[context] * batch, new=[1] * batch)
    absorbed, expanded = _layer("always"), _layer("never")
    expanded.load_state_dict(absorbed.state_dict())

    def dense_step():  # a fresh copy each call so the cache does not grow between repeats
        cache = LatentKVCache([latent], [k_rope])
        return expanded(x, positions, cache, 0)

    with torch.inference_mode():
        err = (absorbed(packed, positions.view(1, batch), PagedKVView(pool, step), 0).view_as(x) - dense_step()).abs().max().item()
        times = time_interleaved({"dense": dense_step,
                                  "paged": lambda: absorbed(packed, positions.view(1, batch), PagedKVView(pool, step), 0)}, repeats)
    return {"shape": {"batch": batch, "context": context, "block_size": BLOCK_SIZE, "heads": cfg.num_attention_heads,
                      "kv_lora_rank": cfg.kv_lora_rank}, "dense_expanded_s": times["dense"],
            "paged_absorbed_s": times["paged"], "speedup": times["dense"] / times["paged"], "max_abs_diff": err}
