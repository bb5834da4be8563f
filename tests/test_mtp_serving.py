"""MTP speculative decoding through the whole suite on the shipped trained model in fp32, with two
microbatches and few KV blocks per die (preemption): greedy tokens of held-out prompts equal the
plain in-process engine's token for token, a client that leaves mid-stream gets a prefix of its
tokens, the drafts are counted (vLLM's counters), and the decode's KV returns to idle. int8-pasa
with MTP through the suite: tests/test_k8s_boot.py (the default deployment); 64 x 64 tokens,
migration and both precisions: scripts/mtp_exactness.py. (A preempted int8-pasa request is
recomputed as a prompt chunk, whose PASA rounding differs from its decode steps', MTP or not:
docs/mtp.md.)"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import yaml

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.clients.gateway import GatewayClient
from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.sampling_params import SamplingParams
from cloudmatrix.train.corpus import load_corpus
from tests.metrics_text import scrape, value
from tests.test_shipped_model import MODEL
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(500)
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 6, 24, 24


def cmx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmatrix.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def held_out_prompts() -> list[list[int]]:
    """Openings of texts from the test split (never trained on)."""
    tokenizer, texts = TextTokenizer.load(MODEL), load_corpus().texts("test")
    return [tokenizer.encode(texts[i * 7])[:PROMPT_TOKENS] for i in range(PROMPTS)]


def _topology(path, checkpoint, precision: str, decode: dict):
    common = {"checkpoint": str(checkpoint), "precision": precision, "fabric": "{addresses:fabric}",
              "kvcache": "{addresses:kvcache}"}
    services = [{"name": "kvcache", "service": "kvcache", "count": 2}, {"name": "fabric", "service": "ub_fabric"},
                {"name": "ddie", "service": "npu_emulator", "count": 2},
                {"name": "decode", "service": "decode", "set": {**common, "dies": "{addresses:ddie}", **decode}},
                {"name": "pdie", "service": "npu_emulator"},
                {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}},
                {"name": "gateway", "service": "gateway",
                 "set": {"checkpoint": str(checkpoint), "prefill": "{addresses:prefill}", "decode": "{addresses:decode}"}}]
    path.write_text(yaml.safe_dump({"name": f"mtp-{precision}", "services": services}))
    return path


async def _serve(address: str, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Every prompt at once, greedy; and one more stream the client leaves after 3 tokens."""
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    async with GatewayClient(address) as gateway:
        model = (await gateway.list_models())[0].id

        async def tokens(prompt: list[int], leave_after: int | None = None) -> list[int]:
            out: list[int] = []
            async for chunk in gateway.generate(model, prompt, params):
                out += chunk.token_ids
                if leave_after is not None and len(out) >= leave_after:
                    break
            return out

        *whole, left = await asyncio.gather(*(tokens(p) for p in prompts), tokens(prompts[0][:-5], leave_after=3))
    return whole, left


def test_speculative_decoding_through_the_suite_gives_the_plain_greedy_tokens(tmp_path, held_out_prompts):
    checkpoint, precision = MODEL, "fp32"
    decode = {"microbatches": 2, "kv_blocks_per_die": 5}  # 5 blocks of 16 per die: preemption
    run_dir = tmp_path / "run"
    up = cmx("up", "--topology", str(_topology(tmp_path / "t.yaml", checkpoint, precision, decode)),
             "--run-dir", str(run_dir))
    assert up.returncode == 0, up.stderr
    try:
        gateway = json.loads((run_dir / "ready" / "gateway-0.json").read_text())
        whole, left = asyncio.run(_serve(f"127.0.0.1:{gateway['port']}", held_out_prompts))
        metrics_port = json.loads((run_dir / "ready" / "decode-0.json").read_text())["metrics_port"]
        assert wait_for(lambda: value(scrape(metrics_port), "cmx_kv_cache_usage_ratio") == 0.0, 60), \
            "the decode's KV blocks did not return to idle"
        metrics = scrape(metrics_port)
    finally:
        down = cmx("down", "--run-dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    model = load_for_precision(checkpoint, parse_precision(precision))
    reference = [list(generate(model, p, SamplingParams(max_tokens=NEW_TOKENS), ignore_eos=True))
                 for p in held_out_prompts]
    assert whole == reference
    left_reference = list(generate(model, held_out_prompts[0][:-5], SamplingParams(max_tokens=NEW_TOKENS),
                                   ignore_eos=True))
    assert 3 <= len(left) < NEW_TOKENS and left == left_reference[:len(left)]
    drafts = value(metrics, "cmx_spec_decode_num_drafts_total")
    accepted = value(metrics, "cmx_spec_decode_num_accepted_tokens_total")
    assert value(metrics, "cmx_spec_decode_num_accepted_tokens_per_pos_total", position="0") == accepted
    assert drafts > 0 and 0.3 < accepted / drafts <= 1.0  # the trained MTP module guesses well
    assert value(metrics, "cmx_num_preemptions_total") > 0
