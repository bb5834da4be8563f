"""Our DeepSeek-V3 against transformers' DeepseekV3ForCausalLM on the same checkpoint (fp32)."""
from __future__ import annotations

import pytest
import torch
import transformers  # a test dependency (pyproject's [test] extra): missing, the suite fails here

from cloudmatrix.checkpoints import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval(), load_model(tiny_checkpoint)


def _random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1024, (batch, length), generator=gen)


@pytest.mark.parametrize("seed", [11, 12])
def test_prompt_batch_logits_match_transformers(models, seed):
    hf, ours = models
    ids = _random_ids(3, 41, seed)
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(ids, torch.arange(41).expand(3, -1), ours.new_cache())
    assert ref.abs().max() > 1.0  # logits are not degenerate
    assert (got - ref).abs().max().item() <= TOL


def test_incremental_decode_with_cache_matches_transformers(models):
    hf, ours = models
    ids = _random_ids(2, 30, seed=13)
    positions = torch.arange(30).expand(2, -1)
    with torch.no_grad():
        out = hf(ids[:, :17], use_cache=True)
        cache_hf, ref = out.cache, [out.logits]
        for i in range(17, 30):
            out = hf(ids[:, i:i + 1], cache=cache_hf, use_cache=True)
            cache_hf = out.cache
            ref.append(out.logits)
    cache = ours.new_cache()
    got = [ours(ids[:, :17], positions[:, :17], cache)]
    got += [ours(ids[:, i:i + 1], positions[:, i:i + 1], cache) for i in range(17, 30)]
    assert (torch.cat(got, 1) - torch.cat(ref, 1)).abs().max().item() <= TOL


def test_routing_uses_several_experts_and_groups(models):
    _, ours = models
    moe = ours.model.layers[1].mlp
    x = torch.randn(64, ours.cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    routing = moe.gate(x)
    assert routing.expert_ids.unique().numel() > ours.cfg.num_experts_per_tok
    groups = routing.expert_ids // (ours.cfg.n_routed_experts // ours.cfg.n_group)
    assert all(g.unique().numel() <= ours.cfg.topk_group for g in groups)
    torch.testing.assert_close(routing.weights.sum(-1), torch.full((64,), ours.cfg.routed_scaling_factor))
