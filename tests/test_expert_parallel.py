"""Expert-parallel MoE with dies as threads of one process: same logits as the in-process model."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.moe.die_model import build_die_model, default_dispatch_dtype
from cloudmatrix.moe.local_exchange import ThreadGroup
from cloudmatrix.moe.placement import ExpertPlacement

TOL = 1e-4


def _placement(cfg, dies: int, replicas: int = 1) -> ExpertPlacement:
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    experts = tuple(tuple((e + r) % dies for r in range(replicas)) for e in range(cfg.n_routed_experts))
    return ExpertPlacement(dies, cfg.n_routed_experts, {layer: experts for layer in layers})


def _run_dies(checkpoint, precision, placement, batches, dtype=None):
    """Each die (a thread) runs prefill + one decode step on its own rows; returns logits per die."""
    group = ThreadGroup(placement.num_dies)
    prec = parse_precision(precision)
    models = [build_die_model(checkpoint, prec, placement, group.member(d), dtype or default_dispatch_dtype(prec))
              for d in range(placement.num_dies)]

    def run(die):
        model, ids = models[die], batches[die]
        cache, length = model.new_cache(), ids.shape[1] - 1
        prefill = model(ids[:, :-1], torch.arange(length).expand(ids.shape[0], -1), cache)
        decode = model(ids[:, -1:], torch.full((ids.shape[0], 1), length), cache)
        return torch.cat([prefill, decode], dim=1)

    with ThreadPoolExecutor(placement.num_dies) as pool:
        return list(pool.map(run, range(placement.num_dies))), models


def _reference(checkpoint, precision, batches):
    model = load_for_precision(checkpoint, parse_precision(precision))
    out = []
    for ids in batches:
        cache, length = model.new_cache(), ids.shape[1] - 1
        prefill = model(ids[:, :-1], torch.arange(length).expand(ids.shape[0], -1), cache)
        out.append(torch.cat([prefill, model(ids[:, -1:], torch.full((ids.shape[0], 1), length), cache)], dim=1))
    return out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("dies,replicas", [(4, 1), (2, 1), (4, 2)])
def test_expert_parallel_logits_equal_in_process(tiny_checkpoint, precision, dies, replicas):
    cfg = load_for_precision(tiny_checkpoint, parse_precision("fp32")).cfg
    gen = torch.Generator().manual_seed(dies * 10 + replicas)
    batches = [torch.randint(3, 1024, (2, 9), generator=gen) for _ in range(dies)]  # 2 sequences per die
    got, models = _run_dies(tiny_checkpoint, precision, _placement(cfg, dies, replicas), batches)
    ref = _reference(tiny_checkpoint, precision, batches)
    for g, r in zip(got, ref):
        assert (g - r).abs().max().item() <= TOL
    counts = sum(m.model.layers[1].mlp.token_counts for m in models)
    assert counts.sum().item() == 2 * dies * 9 * cfg.num_experts_per_tok  # every (token, expert) pair once


def test_die_holds_only_its_experts(tiny_checkpoint):
    cfg = load_for_precision(tiny_checkpoint, parse_precision("fp32")).cfg
    placement = _placement(cfg, 4)
    group = ThreadGroup(4)
    model = build_die_model(tiny_checkpoint, parse_precision("fp32"), placement, group.member(1), "float32")
    assert sorted(int(e) for e in model.model.layers[2].mlp.experts) == [1, 5, 9, 13]


def test_bfloat16_dispatch_is_close_but_not_exact(tiny_checkpoint):
    cfg = load_for_precision(tiny_checkpoint, parse_precision("fp32")).cfg
    batches = [torch.randint(3, 1024, (2, 9), generator=torch.Generator().manual_seed(d)) for d in range(2)]
    got, _ = _run_dies(tiny_checkpoint, "fp32", _placement(cfg, 2), batches, dtype="bfloat16")
    ref = _reference(tiny_checkpoint, "fp32", batches)
    err = max((g - r).abs().max().item() for g, r in zip(got, ref))
    assert 0 < err < 0.05
