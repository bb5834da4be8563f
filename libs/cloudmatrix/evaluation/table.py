"""The text tables `cmx eval` prints (and the model card shows)."""
from __future__ import annotations


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _scores(row: dict) -> str:
    return f"{row['cross_entropy']:>10.4f} {row['perplexity']:>8.2f} {row['bits_per_byte']:>10.4f}"


def quality_table(report: dict) -> str:
    lines = [f"{'model':<22} {'CE (nats)':>10} {'ppl':>8} {'bits/byte':>10} {'top-1':>7} {'vs base':>9} {'agree':>7}"]
    for name, row in report["baselines"].items():
        label = {"unigram": "unigram (add-one)", "kn_trigram": "3-gram (Kneser-Ney)"}[name]
        lines.append(f"{label:<22} {_scores(row)} {_fmt(row['top1_accuracy'], '.4f'):>7} {'':>9} {'':>7}")
    for name, row in report["precisions"].items():
        vs = f"{row['cross_entropy_vs_base_pct']:+.3f}%" if "cross_entropy_vs_base_pct" in row else ""
        agree = _fmt(row.get("top1_agreement_with_base"), ".4f") if vs else ""
        label = name + (f" (vs {row['base']})" if vs else "")
        lines.append(f"{label:<22} {_scores(row)} {row['top1_accuracy']:>7.4f} {vs:>9} {agree:>7}")
    return "\n".join(lines)


def mtp_lines(report: dict) -> list[str]:
    mtp = report.get("mtp")
    if not mtp:
        return []
    acc = mtp["greedy_acceptance"]
    if acc is None:
        return [f"MTP module: top-1 accuracy on t+2 {mtp['top1_accuracy_t_plus_2']:.4f} ({mtp['predictions']} positions)"]
    return [f"MTP module: top-1 accuracy on t+2 {mtp['top1_accuracy_t_plus_2']:.4f} ({mtp['predictions']} positions); "
            f"greedy acceptance {acc['acceptance']:.4f} ({acc['accepted']}/{acc['drafts']} drafts, "
            f"{acc['prompts']} prompts x {acc['new_tokens']} tokens)"]


def expert_lines(report: dict) -> list[str]:
    load = report.get("expert_load")
    if not load:
        return []
    parts = [f"layer {layer} {ratio:.2f}" for layer, ratio in zip(load["layers"], load["max_over_mean"])]
    if load.get("mtp_layer"):
        parts.append(f"MTP {load['mtp_layer']['max_over_mean']:.2f}")
    return ["expert load max/mean (fp32, test split): " + ", ".join(parts)]


def target_lines(report: dict) -> list[str]:
    out = []
    for name, t in report["targets"].items():
        out.append(f"  {'met' if t['met'] else 'MISSED':<6} {name}: {t['value']} (target {t['target']})")
    return ["targets:", *out] if out else []


def render(report: dict) -> str:
    head = (f"{report['model']} on the test split: {report['windows']} windows of {report['seq_len']} tokens "
            f"({report['precisions'][next(iter(report['precisions']))]['tokens']} predictions)")
    notes = [f"note: {d}" for d in report["corpus"]["differences_from_training"]]
    return "\n".join([head, *notes, quality_table(report), *mtp_lines(report), *expert_lines(report),
                      *target_lines(report)])
