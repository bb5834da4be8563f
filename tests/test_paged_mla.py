"""MLA over the paged latent KV pool: block allocation, ragged batches, absorbed vs expanded."""
from __future__ import annotations

import random

import pytest
import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.kv.block_pool import BlockAllocator, PagedLatentPool, PoolShape
from cloudmatrix.kv.paged_view import PagedBatch, PagedKVView

TOL = 1e-4
BLOCK = 4


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def test_allocator_exhaustion_free_and_double_free():
    alloc = BlockAllocator(5)
    first = alloc.allocate(3)
    assert sorted(first) == [0, 1, 2] and alloc.num_free == 2
    assert alloc.allocate(3) is None and alloc.num_free == 2  # "not now", nothing taken
    alloc.free(first[:2])
    assert alloc.num_free == 4 and len(set(alloc.allocate(4))) == 4
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([first[0], first[0]])


def _pool(model, num_blocks=64):
    cfg = model.cfg
    return PagedLatentPool(PoolShape(cfg.num_hidden_layers, num_blocks, BLOCK, cfg.kv_lora_rank, cfg.qk_rope_head_dim))


def _dense_logits(model, ids: list[int], decode_from: int) -> torch.Tensor:
    """Reference: one sequence alone on the dense cache; prompt then token-by-token. [len, V]"""
    cache = model.new_cache()
    out = [model(torch.tensor([ids[:decode_from]]), torch.arange(decode_from)[None], cache)[0]]
    for i in range(decode_from, len(ids)):
        out.append(model(torch.tensor([[ids[i]]]), torch.tensor([[i]]), cache)[0])
    return torch.cat(out)


def _shuffled_tables(pool, lengths, rng):
    ids = pool.allocator.allocate(sum((n + BLOCK - 1) // BLOCK for n in lengths))
    rng.shuffle(ids)  # blocks of a sequence are scattered over the pool
    tables, start = [], 0
    for n in lengths:
        count = (n + BLOCK - 1) // BLOCK
        tables.append(ids[start:start + count])
        start += count
    return tables


def test_ragged_batch_prefill_then_decode_matches_dense_per_sequence(model):
    rng = random.Random(7)
    prompts = [rng.randrange(3, 7), 9, 14]  # lengths; not block multiples
    steps = 5
    seqs = [[rng.randrange(3, 1024) for _ in range(p + steps)] for p in prompts]
    pool = _pool(model)
    tables = _shuffled_tables(pool, [p + steps for p in prompts], rng)
    batch = PagedBatch(tables, cached=[0] * 3, new=prompts)
    ids = torch.tensor([t for s, p in zip(seqs, prompts) for t in s[:p]])[None]  # packed: [1, sum(prompts)]
    prefill = model(ids, batch.positions(), PagedKVView(pool, batch))[0]  # [sum(prompts), V]
    got = [[chunk] for chunk in prefill.split(prompts)]
    for step in range(steps):
        batch = PagedBatch(tables, cached=[p + step for p in prompts], new=[1, 1, 1])
        step_ids = torch.tensor([[s[p + step] for s, p in zip(seqs, prompts)]])  # [1, 3]
        logits = model(step_ids, batch.positions(), PagedKVView(pool, batch))[0]
        for b in range(3):
            got[b].append(logits[b:b + 1])
    for b, (seq, p) in enumerate(zip(seqs, prompts)):
        ref = _dense_logits(model, seq, p)
        assert (torch.cat(got[b]) - ref).abs().max().item() <= TOL


def test_chunked_prefill_over_the_pool_equals_one_shot(model):
    rng = random.Random(3)
    seq = [rng.randrange(3, 1024) for _ in range(23)]
    pool = _pool(model)
    table = _shuffled_tables(pool, [23], rng)
    chunks, cached, got = [8, 8, 7], 0, []
    for n in chunks:  # chunked prefill: each chunk attends to the blocks written before it
        batch = PagedBatch(table, cached=[cached], new=[n])
        got.append(model(torch.tensor([seq[cached:cached + n]]), batch.positions(), PagedKVView(pool, batch))[0])
        cached += n
    ref = model(torch.tensor([seq]), torch.arange(23)[None], model.new_cache())[0]
    assert (torch.cat(got) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("absorb", ["always", "never"])
def test_absorbed_and_expanded_attention_agree(model, absorb):
    ids = torch.randint(3, 1024, (2, 19), generator=torch.Generator().manual_seed(9))
    positions = torch.arange(19).expand(2, -1)
    model.attention.absorb = absorb
    try:
        got = model(ids, positions, model.new_cache())
    finally:
        model.attention.absorb = "decode"
    ref = model(ids, positions, model.new_cache())  # prefill: expanded under the default
    assert (got - ref).abs().max().item() <= TOL


def test_block_table_too_short_is_an_error(model):
    pool = _pool(model, num_blocks=4)
    with pytest.raises(ValueError, match="need 2"):
        PagedKVView(pool, PagedBatch([[0]], cached=[0], new=[5]))
