"""Write a trained model's card (README.md) from the files `cmx train` and `cmx eval` left in its
folder: train.json, eval.json, expert_load.json. Every number in the card comes from them; the
file table hashes what is there. Run after copying a run into models/<name>/:

    python scripts/model_card.py models/cmx-tiny-py --command "cmx train --out A ..." \\
        --command "cmx train --out B --init-from A ..." --notes notes.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from cloudmatrix.moe.eplb import balance, layer_imbalance
from cloudmatrix.moe.placement import ExpertPlacement

EPLB_DIES, EPLB_REDUNDANT = 4, 4


def _params(folder: Path, num_hidden_layers: int) -> tuple[int, int]:
    """(main model, MTP module) parameter counts; the MTP layer's copies of shared tensors excluded."""
    main = mtp = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            n = f.get_slice(key).get_shape()
            count = int(torch.tensor(n).prod()) if n else 1
            if key.startswith(f"model.layers.{num_hidden_layers}."):
                if not key.endswith(("embed_tokens.weight", "shared_head.head.weight")):
                    mtp += count
            else:
                main += count
    return main, mtp


def _quality_rows(ev: dict) -> list[str]:
    rows = ["| model | cross-entropy (nats/token) | perplexity | bits/byte | top-1 | vs base | top-1 agreement with base |",
            "|---|---|---|---|---|---|---|"]
    names = {"unigram": "unigram (add-one), train split", "kn_trigram": "3-gram (interpolated Kneser-Ney), train split"}
    for key, row in ev["baselines"].items():
        top1 = "-" if row["top1_accuracy"] is None else f"{row['top1_accuracy']:.4f}"
        rows.append(f"| {names[key]} | {row['cross_entropy']:.4f} | {row['perplexity']:.2f} | "
                    f"{row['bits_per_byte']:.4f} | {top1} | | |")
    for key, row in ev["precisions"].items():
        vs = f"{row['cross_entropy_vs_base_pct']:+.3f}% vs {row['base']}" if "base" in row else ""
        agree = f"{row['top1_agreement_with_base']:.4f}" if "base" in row else ""
        rows.append(f"| **{key}** | {row['cross_entropy']:.4f} | {row['perplexity']:.2f} | {row['bits_per_byte']:.4f} | "
                    f"{row['top1_accuracy']:.4f} | {vs} | {agree} |")
    return rows


def _target_rows(ev: dict) -> list[str]:
    text = {"fp32_below_trigram_pct": "fp32 cross-entropy below the 3-gram's (%)",
            "int8_ce_within_pct": "INT8 W8A8 cross-entropy vs fp32 (%, within)",
            "int8_top1_agreement": "INT8 W8A8 top-1 agreement with fp32",
            "pasa_ce_within_pct": "PASA cross-entropy vs fp32 (%, within)",
            "int8-pasa_ce_within_pct": "INT8 + PASA cross-entropy vs INT8 (%, within)",
            "mtp_greedy_acceptance": "MTP greedy acceptance"}
    rows = ["| target (issue 23) | measured | target | |", "|---|---|---|---|"]
    for key, t in ev["targets"].items():
        rows.append(f"| {text[key]} | {t['value']:.4f} | {t['target']} | {'met' if t['met'] else '**missed**'} |")
    return rows


def _expert_rows(load: dict) -> list[str]:
    counts = torch.tensor(load["token_counts"], dtype=torch.int64)
    layers = load["layers"]
    current = ExpertPlacement.round_robin(layers, counts.shape[1], EPLB_DIES)
    planned = balance(counts, EPLB_DIES, EPLB_REDUNDANT, layers=layers)
    before, after = layer_imbalance(current, counts, layers), layer_imbalance(planned, counts, layers)
    rows = ["| MoE layer | tokens per expert, max / mean | die load max / mean, 4 dies round-robin | "
            f"after `cmx eplb` ({EPLB_REDUNDANT} redundant) |", "|---|---|---|---|"]
    for layer, ratio, b, a in zip(layers, load["max_over_mean"], before.tolist(), after.tolist()):
        rows.append(f"| {layer} | {ratio:.2f} | {b:.3f} | {a:.3f} |")
    if load.get("mtp_layer"):
        rows.append(f"| {load['mtp_layer']['layer']} (MTP) | {load['mtp_layer']['max_over_mean']:.2f} | | |")
    return rows


def _file_rows(folder: Path) -> list[str]:
    rows = ["| file | SHA-256 | bytes |", "|---|---|---|"]
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != "README.md"):
        rows.append(f"| `{path.name}` | {hashlib.sha256(path.read_bytes()).hexdigest()} | {path.stat().st_size:,} |")
    return rows


def _stage_line(name: str, record: dict, train_tokens: float) -> str:
    s = record["settings"]
    return (f"- {name}: seed {s['seed']}, peak learning rate {s['lr']}; {record['steps']:,} steps of "
            f"{s['batch_size']} x {s['seq_len']} tokens = {record['tokens'] / 1e6:.2f} M tokens (about "
            f"{record['tokens'] / train_tokens:.1f} epochs of the train split); {record['wall_time_s'] / 60:.1f} min "
            f"of training on {s['threads']} threads.")


def _training_lines(train: dict, train_tokens: float) -> list[str]:
    """One line per run (a continued run names its starting checkpoint), the totals, the recipe."""
    s, fin, first = train["settings"], train["final"], train.get("init_from")
    lines = []
    if first:
        lines += [_stage_line("First run", first, train_tokens),
                  _stage_line("Continued run (`--init-from` the first run's checkpoint, SHA-256 "
                              f"`{first['model_sha256'][:16]}…`; a new AdamW and schedule)", train, train_tokens)]
    tokens = train["tokens"] + (first["tokens"] if first else 0)
    wall = train["wall_time_s"] + (first["wall_time_s"] if first else 0)
    head = "In all" if first else f"Seed {s['seed']}"
    lines += [
        f"- {head}: "
        f"{train['steps'] + (first['steps'] if first else 0):,} steps, {tokens / 1e6:.2f} M tokens "
        f"(about {tokens / train_tokens:.1f} epochs of the train split), {wall / 60:.1f} min of training on "
        f"{train['threads']} threads (torch {train['torch']}, a 2-core machine).",
        f"- AdamW, {s['warmup_steps']} warm-up steps, cosine to {s['min_lr_ratio']} x peak, weight decay "
        f"{s['weight_decay']}, clipping {s['grad_clip']}; MTP loss weight {s['mtp_weight']} then "
        f"{s['mtp_weight_late']}; balance loss {s['balance_alpha']}; bias update speed {s['bias_speed']}.",
        f"- Final training losses (last logged step): next token {fin['train']['lm']:.4f}, MTP "
        f"{fin['train']['mtp']:.4f}; validation: next token {fin['validation']['lm']:.4f}, MTP "
        f"{fin['validation']['mtp']:.4f} ({s['eval_windows']} windows of {s['seq_len']}).",
    ]
    return lines


def _eval_scope(ev: dict) -> str:
    if ev["windows"] == ev.get("split_windows"):
        return "The whole test split, every window."
    return (f"The first {ev['windows']:,} windows of the test split's {ev.get('split_windows', '?')} "
            "(its files in path order).")


def render(folder: Path, commands: list[str], notes: str) -> str:
    train = json.loads((folder / "train.json").read_text())
    ev = json.loads((folder / "eval.json").read_text())
    load = json.loads((folder / "expert_load.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    main, mtp = _params(folder, cfg["num_hidden_layers"])
    corpus = train["corpus"]
    mtp_ev = ev["mtp"]
    acc = mtp_ev["greedy_acceptance"]
    train_tokens = corpus["bytes"]["train"] / train["tokenizer"]["validation_bytes_per_token"]  # approximate
    lines = [
        f"# {cfg['model_id']}: a DeepSeek-V3-architecture model trained on the Python standard library", "",
        "The project's default model: MLA attention, MoE with group-limited sigmoid routing and a shared expert, "
        "auxiliary-loss-free load balancing, and one multi-token-prediction (MTP) module, trained from scratch by "
        "`cmx train` (docs/training.md) with the serving code's own model definition. It completes Python code; it "
        "knows nothing else.", "",
        f"- **Size**: {main / 1e6:.2f} M parameters in the main model, {mtp / 1e6:.2f} M in the MTP module; "
        f"{cfg['num_hidden_layers']} layers ({cfg['first_k_dense_replace']} dense), hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads, {cfg['n_routed_experts']} routed experts (top-{cfg['num_experts_per_tok']}, "
        f"{cfg['n_group']} groups, {cfg['topk_group']} kept) + {cfg['n_shared_experts']} shared, vocabulary "
        f"{cfg['vocab_size']:,}, context {cfg['max_position_embeddings']:,}.",
        "- **Format**: Hugging Face layout as DeepSeek-V3 publishes it: `config.json` with "
        "`num_nextn_predict_layers: 1`, weights in bf16 (router biases fp32) in `model.safetensors`, the MTP module "
        f"under `model.layers.{cfg['num_hidden_layers']}.` (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, "
        "`shared_head.head`, `embed_tokens`, and a decoder layer). transformers' `DeepseekV3ForCausalLM` loads it "
        "(ignoring the MTP layer).", "",
        "## Data", "",
        f"- **Corpus**: {corpus['source']}, Python {corpus['python_version']} (`{corpus['root']}`). Licence: the "
        "Python Software Foundation License (PSF-2.0), which allows redistribution of derived works with the "
        "copyright notice; this card is that notice: Copyright (c) 2001-2023 Python Software Foundation; All Rights "
        "Reserved.",
        f"- **Split** (by file): {corpus['split_rule']}. Files train / validation / test: "
        f"{corpus['files']['train']:,} / {corpus['files']['validation']:,} / {corpus['files']['test']:,}; bytes "
        f"{corpus['bytes']['train']:,} / {corpus['bytes']['validation']:,} / {corpus['bytes']['test']:,}. "
        f"SHA-256 of the sorted file list: `{corpus['file_list_sha256']}`.",
        f"- **Tokenizer**: byte-level BPE, {train['tokenizer']['vocab_size']:,} ids, trained on the train split; "
        f"{train['tokenizer']['validation_bytes_per_token']:.2f} bytes per token on the validation split.", "",
        "## Training", "",
        "```\n" + "\n".join(commands) + "\n```", "",
        *_training_lines(train, train_tokens), "",
        "![loss curve](loss.png)", "",
        "## Quality on the test split (`cmx eval`)", "",
        f"{ev['windows']:,} windows of {ev['seq_len']} tokens "
        f"({ev['precisions']['fp32']['tokens']:,} predicted tokens), threads: {ev.get('threads', '?')}:", "",
        "```\ncmx eval --checkpoint models/cmx-tiny-py --threads 2"
        + ("" if ev["windows"] == ev.get("split_windows") else f" --max-windows {ev['windows']}")
        + " --json models/cmx-tiny-py/eval.json --out-dir models/cmx-tiny-py\n```", "",
        _eval_scope(ev), "",
        *_quality_rows(ev), "",
        f"MTP module: top-1 accuracy on t+2 (teacher-forced) **{mtp_ev['top1_accuracy_t_plus_2']:.4f}**; greedy "
        f"acceptance **{acc['acceptance']:.4f}** ({acc['accepted']:,} of {acc['drafts']:,} drafts: {acc['prompts']} "
        f"prompts of {acc['prompt_tokens']} tokens, {acc['new_tokens']} greedy steps each).", "",
        *_target_rows(ev), "",
        "## Expert load (fp32 router, test split)", "",
        *_expert_rows(load), "",
        "![expert load](expert_load.png)", "",
        "## Notes", "", notes, "",
        "## Files", "",
        *_file_rows(folder), "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--command", required=True, action="append",
                        help="a cmx train command that made the model (repeat for a continued run, in order)")
    parser.add_argument("--notes", type=Path, help="a markdown file with the card's notes")
    args = parser.parse_args()
    notes = args.notes.read_text().strip() if args.notes else "(none)"
    (args.folder / "README.md").write_text(render(args.folder, args.command, notes))
    print(f"wrote {args.folder / 'README.md'}")


if __name__ == "__main__":
    main()
