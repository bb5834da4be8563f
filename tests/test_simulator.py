"""The CloudMatrix384 simulator (`cmx simulate`): four pre-registered constants are fitted on a
declared training subset of the paper's observations; every other observation is held out and is
the test of the model. The held-out observations docs/simulator.md claims within the bound are
asserted against the paper's own figures (../shared/PAPERS.md); the ones it reports as misses are
not asserted at all (a change that fixes one can only make tests pass). Then the calibration
(refit, leave-one-out, bands, sensitivity), the step fluctuation against sampling, the model's own
laws (monotone in batch and context, the roofline under ideal efficiencies), microbatch choice,
SLO search and capacity planning against brute force, and the CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cloudmatrix.cli.main import main
from cloudmatrix.costmodel.die import ASCEND_910C_DIE, IDEAL_EFFICIENCY, roofline_s
from cloudmatrix.costmodel.ops import DEEPSEEK_V3
from cloudmatrix.simulator.calibration import CONSTANTS, FITTED, PRIOR, TRAINING, Calibration
from cloudmatrix.simulator.decode import DecodeSetup, largest_batch_within, simulate_decode
from cloudmatrix.simulator.experts import step_fluctuation
from cloudmatrix.simulator.paper import BATCH_GRID, BOUND, median_abs_error, paper_rows, slo_batches
from cloudmatrix.simulator.planning import parse_duration_s, plan
from cloudmatrix.simulator.prefill import PrefillSetup, simulate_prefill
from cloudmatrix.simulator.validation import validate

# The paper's figures (PAPERS.md, headline tables and s2), typed here from the paper, not from the
# model: observation -> the paper's value. These are the held-out observations docs/simulator.md
# claims within +-20% (today all of them); its misses are listed there, with their cause.
CLAIMED_WITHIN = {
    "prefill_perfect": 6688, "slo_50ms_1024": 46.8, "slo_50ms_2048": 47.4, "slo_50ms_4096": 49.4,
    "slo_30ms_4096": 24.6, "microbatch_64": 1.058, "microbatch_128": 1.069, "mtp_on_layer": 1260,
}
CLAIMED_MEDIAN = 0.10   # docs/simulator.md: the held-out median absolute error is within 10%
# The SLO searches docs/simulator.md claims land on the paper's batch or the next size tried:
# SLO (ms), prompt -> the paper's largest batch per NPU within it.
CLAIMED_BATCHES = {(50, 1024): 128, (15, 4096): 8}


@pytest.fixture(scope="module")
def rows():
    return paper_rows()


@pytest.fixture(scope="module")
def report():
    return validate()


def test_every_observation_is_predicted_once_and_is_training_or_held_out(rows):
    tables = [r.table for r in rows]
    assert tables.count("prefill") == 2 and tables.count("slo") == 5 and tables.count("microbatch") == 3
    assert tables.count("mtp") == 2 and tables.count("context_cache") == 2
    assert len({r.key for r in rows}) == len(rows) and all(r.predicted > 0 for r in rows)
    for r in (r for r in rows if r.table == "slo"):  # tokens/s is shown beside its TPOT, not scored twice
        batch_per_npu = int(r.label.rsplit(" ", 1)[1])
        assert r.shown["tokens_per_s_per_npu"] == pytest.approx(batch_per_npu / (r.predicted / 1e3))
    splits = {r.key: r.split for r in rows}
    assert sorted(k for k, v in splits.items() if v == "train") == sorted(TRAINING) and len(TRAINING) <= len(CONSTANTS)
    assert sum(v == "held out" for v in splits.values()) == 8 and len(CONSTANTS) <= 4


@pytest.mark.parametrize("key", sorted(CLAIMED_WITHIN))
def test_the_held_out_observations_claimed_within_the_bound_are_within_it_of_the_paper(rows, key):
    [row] = [r for r in rows if r.key == key]
    assert row.split == "held out" and row.paper == CLAIMED_WITHIN[key]
    assert abs(row.predicted / CLAIMED_WITHIN[key] - 1) <= BOUND, (key, row.predicted)


def test_the_held_out_median_error_is_what_the_docs_claim(rows):
    assert median_abs_error([r for r in rows if r.split == "held out"]) <= CLAIMED_MEDIAN


@pytest.mark.parametrize("slo_prompt", sorted(CLAIMED_BATCHES))
def test_the_slo_searches_claimed_to_match_find_the_papers_batch_or_the_next_size(slo_prompt):
    [found] = [b for b in slo_batches() if (b["slo_ms"], b["prompt"]) == slo_prompt]
    paper = CLAIMED_BATCHES[slo_prompt]
    assert found["predicted_batch_per_npu"] in (paper, paper + BATCH_GRID) and found["predicted_tpot_ms"] <= slo_prompt[0]


def test_the_fit_from_the_prior_lands_on_the_stored_constants(report):
    """FITTED is what the declared fit gives (rounded), so nothing was tuned by hand."""
    for c in CONSTANTS:
        assert report["refit_from_prior"][c.name] == pytest.approx(getattr(FITTED, c.name),
                                                                   abs=0.01 * (c.high - c.low)), c.name
    assert PRIOR != FITTED  # the fit moved the constants off their priors
    with pytest.raises(ValueError, match="mla_efficiency"):
        Calibration(mla_efficiency=0.9, round_slowdown=1.0, eplb_residual=1.0, launch_s=0.0)


def test_leave_one_out_ranges_and_bands_bracket_the_fitted_predictions(report):
    assert set(report["leave_one_out"]) == set(TRAINING)
    for c in report["constants"]:
        low, high = c["range"]
        assert c["low"] <= low <= c["fitted"] <= high <= c["high"], c["name"]
    for row in report["rows"]:
        low, high = row["band"]
        assert low <= row["predicted"] * (1 + 1e-9) and row["predicted"] <= high * (1 + 1e-9), row["key"]
    errors = report["errors"]
    assert errors["held_out"] == 8 and errors["held_out_median_abs_error"] <= CLAIMED_MEDIAN


def test_every_constant_moves_some_row():
    from cloudmatrix.simulator.validation import sensitivity

    table = sensitivity()
    for c in CONSTANTS:
        assert max(abs(x) for pair in table[c.name].values() for x in pair) > 0.01, c.name
    assert table["mla_efficiency"]["mtp_on_layer"][1] < -0.1  # a faster MLA core: a shorter MTP layer


@pytest.mark.parametrize("mean_rows", [71, 853])
def test_the_step_fluctuation_matches_sampling(mean_rows):
    """Busiest / mean of 288 dies' Poisson row counts, sampled (the formula's independent check)."""
    gen = torch.Generator().manual_seed(mean_rows)
    counts = torch.poisson(torch.full((400, 288), float(mean_rows)), generator=gen)  # [trials, dies]
    sampled = (counts.max(dim=1).values / counts.mean(dim=1)).mean().item()
    assert step_fluctuation(mean_rows, 288) == pytest.approx(sampled, rel=0.03)
    assert step_fluctuation(mean_rows, 1) == 1.0


def test_the_faster_of_one_and_two_microbatches_is_chosen():
    for batch in (1, 2, 4, 12, 48, 64, 96):
        auto = simulate_decode(DecodeSetup(batch_per_die=batch, kv_len=4224))
        fixed = [simulate_decode(DecodeSetup(batch_per_die=batch, kv_len=4224, microbatches=m))
                 for m in ((1, 2) if batch >= 2 else (1,))]
        best = min(fixed, key=lambda r: r.step_s)
        assert auto.step_s == best.step_s and auto.setup.microbatches == best.setup.microbatches
    chosen = {simulate_decode(DecodeSetup(batch_per_die=b, kv_len=4224)).setup.microbatches for b in (1, 4, 48)}
    assert chosen == {1, 2}  # small batches: one; the paper's batch: two


def test_tpot_grows_with_batch_and_context_and_mtp_costs_per_layer_time():
    tpots = [simulate_decode(DecodeSetup(batch_per_die=b)).tpot_s for b in range(2, 130, 4)]
    assert tpots == sorted(tpots) and len(set(tpots)) == len(tpots)
    by_kv = [simulate_decode(DecodeSetup(kv_len=kv)).tpot_s for kv in (512, 2048, 8192, 32768)]
    assert by_kv == sorted(by_kv)
    off, on = simulate_decode(DecodeSetup(mtp=False)), simulate_decode(DecodeSetup(mtp=True))
    assert on.layer_s > off.layer_s and on.tpot_s < on.step_s
    bf16 = simulate_decode(DecodeSetup(int8=False))
    assert bf16.tpot_s > on.tpot_s  # INT8 halves weight traffic and dispatch bytes


def test_ideal_efficiency_is_the_roofline():
    """With every efficiency 1 and no launch cost, the MLA core is exactly max(FLOPs / peak,
    bytes / bandwidth), counted here from first principles; the ideal model is never slower."""
    cfg, b, q, kv = DEEPSEEK_V3, 48, 2, 4096
    ideal = simulate_decode(DecodeSetup(batch_per_die=b, kv_len=kv), eff=IDEAL_EFFICIENCY)
    heads, latent = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    keys = b * sum(kv - q + i + 1 for i in range(q))  # causal: query i sees kv - q + i + 1 keys
    flops = 2 * heads * keys * (latent + cfg.kv_lora_rank)
    nbytes = 2 * (b * kv * latent + b * q * heads * (latent + cfg.kv_lora_rank))
    expected = roofline_s(flops, nbytes, ASCEND_910C_DIE.fp16_flops, ASCEND_910C_DIE.hbm_bandwidth)
    assert ideal.attention.breakdown()["mla"] == pytest.approx(expected)
    assert ideal.step_s < simulate_decode(DecodeSetup(batch_per_die=b, kv_len=kv)).step_s
    assert simulate_prefill(eff=IDEAL_EFFICIENCY).batch_s < simulate_prefill().batch_s


def test_the_largest_batch_within_an_slo_is_the_brute_force_one():
    setup = DecodeSetup(kv_len=4224, imbalance=1.3)
    slo = 0.030
    best = largest_batch_within(slo, setup)
    feasible = [b for b in range(2, 200) if simulate_decode(dataclasses.replace(setup, batch_per_die=b)).tpot_s <= slo]
    assert best.setup.batch_per_die == max(feasible) and best.tpot_s <= slo
    assert largest_batch_within(1e-4, setup) is None


def test_microbatching_and_context_caching_help_and_eplb_imbalance_hurts():
    one, two = (simulate_prefill(PrefillSetup(microbatches=m)) for m in (1, 2))
    assert two.batch_s < one.batch_s
    hit = simulate_prefill(PrefillSetup(reuse=0.5))
    assert hit.tokens_per_s_per_npu > two.tokens_per_s_per_npu and hit.cache_load_s > 0
    skewed = simulate_prefill(PrefillSetup(imbalance=1.3))
    assert skewed.batch_s > two.batch_s
    assert simulate_decode(DecodeSetup(imbalance=2.0)).moe.total_s > simulate_decode(DecodeSetup()).moe.total_s


def test_capacity_plan_covers_the_demand():
    p = plan(20.0, 4096, 256, 0.05, DecodeSetup(), PrefillSetup())
    assert p.prefill_npus * p.prefill.tokens_per_s_per_npu >= 20.0 * 4096
    assert (p.prefill_npus - 1) * p.prefill.tokens_per_s_per_npu < 20.0 * 4096
    assert p.decode_npus * p.decode.tokens_per_s_per_npu >= 20.0 * 256 and p.decode.tpot_s <= 0.05
    with pytest.raises(ValueError, match="rate"):
        plan(0.0, 4096, 256, 0.05, DecodeSetup(), PrefillSetup())


@pytest.mark.parametrize("text,seconds", [("30ms", 0.03), ("0.05s", 0.05), ("30", 0.03), ("250us", 2.5e-4)])
def test_durations_parse(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("kwargs,field", [({"batch_per_die": 0}, "batch_per_die"), ({"acceptance": 1.5}, "acceptance"),
                                          ({"imbalance": 0.5}, "imbalance"), ({"microbatches": 3}, "microbatches")])
def test_bad_setups_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DecodeSetup(**kwargs)


def test_cli_paper_table_and_json(capsys, tmp_path):
    assert main(["simulate", "--paper", "--json", str(tmp_path / "paper.json")]) == 0
    out = capsys.readouterr().out
    assert "held out: 8 of 8 within +-20%, median absolute error" in out and "MISSED" in out  # an SLO batch
    report = json.loads((tmp_path / "paper.json").read_text())
    assert len(report["rows"]) == 14 and {"paper", "predicted", "error", "within", "split"} <= set(report["rows"][0])
    errors = sorted(abs(r["error"]) for r in report["rows"] if r["bound"] is not None)
    assert report["median_abs_error"] == pytest.approx((errors[5] + errors[6]) / 2)
    assert report["calibration"] == FITTED.values()
    assert [r["table"] for r in report["second_system"]] == ["h800", "h800", "h100", "h100", "h100"]
    assert "second system, held out completely" in out


def test_cli_validate_and_sensitivity(capsys, tmp_path):
    assert main(["simulate", "--validate", "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "pre-registered constants" in out and "leave-one-out" in out and "refit from the prior" in out
    assert set(json.loads((tmp_path / "v.json").read_text())["leave_one_out"]) == set(TRAINING)
    assert main(["simulate", "--sensitivity", "--json", str(tmp_path / "s.json")]) == 0
    assert "mla_efficiency" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "s.json").read_text())) == {c.name for c in CONSTANTS}


@pytest.mark.parametrize("slo_ms", [30, 15])
def test_cli_tpot_slo_answers_with_batch_throughput_and_the_configuration_chosen(capsys, slo_ms):
    assert main(["simulate", "--tpot-slo", f"{slo_ms}ms", "--prompt", "4096", "--output", "256", "--json", "-"]) == 0
    out = capsys.readouterr().out
    assert f"largest batch within a TPOT of {slo_ms} ms" in out and " per die), KV 4224" in out
    report = json.loads(out[out.index("{"):])
    assert report["tpot_ms"] <= slo_ms and report["batch_per_npu"] >= 2 and report["tokens_per_s_per_npu"] > 0
    assert report["setup"]["microbatches"] in (1, 2) and f"{report['setup']['microbatches']} microbatch(es)" in out


def test_cli_what_ifs_plan_and_plot(capsys, tmp_path):
    assert main(["simulate", "--batch", "64", "--kv-len", "8192", "--no-mtp", "--eplb", "perfect"]) == 0
    assert "batch 64/NPU (32 per die), KV 8192, INT8, MTP off" in capsys.readouterr().out
    assert main(["simulate", "--phase", "prefill", "--reuse", "0.5"]) == 0
    assert "50% from the context cache" in capsys.readouterr().out
    assert main(["simulate", "--rate", "20", "--prompt", "4096", "--output", "256"]) == 0
    assert "NPUs" in capsys.readouterr().out
    assert main(["simulate", "--plot", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["simulate", "--batch", "0"]) == 2
    assert "batch_per_die" in capsys.readouterr().err


# The second published system (PAPERS.md, as the CloudMatrix paper cites DeepSeek's H800 profile
# and SGLang's 96 H100): observation -> the paper's value, for the rows docs/simulator.md claims
# within +-20% (SGLang's default-EPLB prefill is reported as a miss there).
SECOND_CLAIMED_WITHIN = {"h800_decode": 50.2, "h800_prefill": 7839, "h100_decode": 55.6, "h100_prefill_perfect": 7417}


@pytest.mark.parametrize("key", sorted(SECOND_CLAIMED_WITHIN))
def test_the_second_system_rows_claimed_within_the_bound_are_within_it(key):
    from cloudmatrix.simulator.others import second_system_rows

    [row] = [r for r in second_system_rows() if r.key == key]
    assert row.split == "held out" and row.paper == SECOND_CLAIMED_WITHIN[key]
    assert abs(row.predicted / SECOND_CLAIMED_WITHIN[key] - 1) <= BOUND, (key, row.predicted)


def test_the_hopper_profile_carries_its_public_figures():
    """Against the sources' own numbers (docs/simulator-sources.md), not the module's constants."""
    from cloudmatrix.simulator.hardware import DEEPEP_LOW_LATENCY, DEEPEP_NORMAL, HARDWARE

    h800 = HARDWARE["h800"]
    assert h800.die.fp16_flops * h800.eff.mla_compute == pytest.approx(660e12)     # FlashMLA
    assert h800.die.hbm_bandwidth * h800.eff.mla_memory == pytest.approx(3000e9)   # FlashMLA
    assert h800.die.int8_ops * h800.eff.int8_gemm == pytest.approx(1350e12)        # DeepGEMM at release
    # DeepEP low-latency at 128 tokens per rank: the README's times; linear in tokens; clamped
    for ep, dispatch, combine in ((8, 163, 318), (128, 192, 369), (256, 194, 360)):
        assert DEEPEP_LOW_LATENCY.round_s("dispatch", 128, ep) == pytest.approx(dispatch * 1e-6)
        assert DEEPEP_LOW_LATENCY.round_s("combine", 256, ep) == pytest.approx(2 * combine * 1e-6)
    assert DEEPEP_LOW_LATENCY.round_s("dispatch", 128, 512) == pytest.approx(194e-6)
    assert 173e-6 < DEEPEP_LOW_LATENCY.round_s("dispatch", 128, 24) < 182e-6
    assert DEEPEP_NORMAL.round_s("dispatch", 58e9, 32) == pytest.approx(1.0)  # 58 GB/s at EP32


def test_remote_nodes_per_token_is_the_brute_force_count():
    """Every choice of 4 of 8 expert groups, equally likely; 32 GPUs = 4 nodes of 2 groups each."""
    import itertools

    from cloudmatrix.simulator.gpu import remote_nodes_per_token

    choices = list(itertools.combinations(range(8), 4))
    own = 0  # the token's own node holds groups 0 and 1
    remote = sum(len({g // 2 for g in c} - {own}) for c in choices) / len(choices)
    assert remote_nodes_per_token(DEEPSEEK_V3, 32) == pytest.approx(remote)
    assert remote_nodes_per_token(DEEPSEEK_V3, 8) == 0.0


def test_gpu_decode_grows_with_batch_and_the_cli_runs_it(capsys):
    from cloudmatrix.simulator.gpu import GpuDecodeSetup, simulate_gpu_decode

    tpots = [simulate_gpu_decode(GpuDecodeSetup(batch=b)).tpot_s for b in (16, 64, 128, 256)]
    assert tpots == sorted(tpots)
    assert main(["simulate", "--hardware", "h800", "--batch", "128", "--no-mtp", "--json", "-"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["hardware"] == "h800" and report["tpot_ms"] > 0 and "decode on h800, EP128" in out
    assert main(["simulate", "--hardware", "h100", "--tpot-slo", "30ms"]) == 2
    assert "cloudmatrix384 only" in capsys.readouterr().err
