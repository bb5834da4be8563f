"""`cmx demo`: send a few requests through a running topology's OpenAI-compatible gateway and show
what happened: completions, TTFT / TPOT, context-cache hits, modeled CloudMatrix384 time, and one
request's trace across every service."""
from __future__ import annotations

import argparse
from pathlib import Path

from cloudmatrix.demo import (
    code_block,
    demo_prompts,
    gateway_url,
    get_json,
    printable,
    stream_completion,
)
from cloudmatrix.instance.metrics import SPEC_SERIES, scrape, speculation
from cloudmatrix.launcher.processes import load_state
from cloudmatrix.telemetry.trace_view import incomplete, render_tree, wait_for_trace


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="requests through the gateway of a running topology, with a trace")
    parser.add_argument("--run-dir", default="runs/local", help="the run directory `cmx up` used")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens to generate per request")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    url = gateway_url(run_dir)
    card = get_json(f"{url}/v1/models")["data"][0]
    model = card["id"]
    print(f"gateway {url}, model {model}")
    if not card.get("trained"):
        print("(this checkpoint has random weights, a deterministic init: its text is a sample of tokens, not an answer)")
    print()
    last = None
    for label, prompt in demo_prompts():
        last = stream_completion(url, model, prompt, args.max_tokens)
        usage = last["usage"]
        print(f"[{label}] prompt ends with {printable(prompt[-40:])}; completion:")
        print(code_block(last["text"]))
        phases = last["timing"].get("phases", {})
        pool, prefill = (phases.get(p, {}).get("modeled_s", 0.0) * 1e3 for p in ("cache_load", "prefill"))
        print(f"    prompt {usage['prompt_tokens']} tokens, {usage['prompt_tokens_details']['cached_tokens']} from the "
              f"context cache; {usage['completion_tokens']} generated; measured TTFT {last['ttft_s'] * 1e3:.0f} ms, "
              f"TPOT {last['tpot_s'] * 1e3:.1f} ms")
        print(f"    modeled CloudMatrix384: TTFT {pool + prefill:.3f} ms (cached prefix from the pool over UB "
              f"{pool:.3f} ms, prefill {prefill:.3f} ms), whole request {last['timing']['modeled_s'] * 1e3:.2f} ms")
    print(_speculation(run_dir))
    request_id = last["id"].split("-", 1)[1]
    spans = wait_for_trace(run_dir / "spans", request_id, timeout_s=15.0)
    services = sorted({s.get("resource", {}).get("service.name", "?") for s in spans})
    missing = incomplete(spans)
    print(f"\ntrace of request {request_id}: {len(spans)} spans from {', '.join(services)}"
          + (f" (incomplete: {'; '.join(missing)})" if missing else ""))
    print(render_tree(spans))
    print(f"(the whole tree: cmx trace {request_id} --all --run-dir {args.run_dir})")
    return 0


def _speculation(run_dir: Path) -> str:
    """The decode instances' MTP drafts so far, as vLLM reports them, next to the paper's."""
    totals = [0.0, 0.0]
    for record in load_state(run_dir.resolve()):
        if record.service == "decode" and record.metrics_port:
            counts = scrape(f"http://127.0.0.1:{record.metrics_port}", SPEC_SERIES)
            totals = [t + counts[name] for t, name in zip(totals, SPEC_SERIES)]
    if not totals[0]:
        return "\nMTP speculative decoding: no draft verified (speculative_tokens 0, or no decode step yet)"
    s = speculation(*totals)
    return (f"\nMTP speculative decoding: {s['accepted_tokens']} of {s['drafts']} drafts accepted: acceptance rate "
            f"{s['acceptance_rate']:.2f}, {s['mean_acceptance_length']:.2f} tokens per verifying step "
            f"(the paper: ~0.7 and ~1.7)")
