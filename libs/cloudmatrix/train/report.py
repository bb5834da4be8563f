"""train.json (settings, corpus, curve, final losses) and the loss-curve PNG of a training run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path

import torch

from cloudmatrix.train.corpus import Corpus


@dataclasses.dataclass
class Curve:
    """Train points every ``log_every`` steps and validation points every ``eval_every``."""

    train: list[dict] = dataclasses.field(default_factory=list)
    validation: list[dict] = dataclasses.field(default_factory=list)

    def add_train(self, step: int, tokens: int, elapsed: float, metrics: dict) -> None:
        self.train.append({"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 2),
                           **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}})

    def add_validation(self, step: int, tokens: int, losses: dict) -> None:
        if self.validation and self.validation[-1]["step"] == step:
            self.validation.pop()
        self.validation.append({"step": step, "tokens": tokens, **losses})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Curve":
        return cls(list(raw["train"]), list(raw["validation"]))


def bytes_per_token(tokenizer, texts: list[str]) -> float:
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return sum(len(t.encode()) for t in texts) / max(n_tokens, 1)


def write_report(out: Path, settings, corpus: Corpus, tokenizer, progress: dict) -> dict:
    curve = Curve.from_dict(progress["curve"])
    report = {
        "model": settings.preset,
        "settings": dataclasses.asdict(settings),
        "corpus": corpus.metadata(),
        "tokenizer": {"vocab_size": tokenizer.get_vocab_size(),
                      "validation_bytes_per_token": round(bytes_per_token(tokenizer, corpus.texts("validation")), 4)},
        "steps": progress["step"], "tokens": progress["tokens"], "wall_time_s": round(progress["elapsed_s"], 1),
        "threads": settings.threads, "torch": torch.__version__, "python": platform.python_version(),
        "final": {"train": curve.train[-1] if curve.train else None,
                  "validation": curve.validation[-1] if curve.validation else None},
        "curve": curve.to_dict(),
    }
    if settings.init_from:
        report["init_from"] = init_from_record(Path(settings.init_from))
    (out / "train.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_curve(curve, out / "loss.png")
    return report


def init_from_record(checkpoint: Path) -> dict:
    """Where a continued run started: the checkpoint's weights hash and, from its own train.json,
    the steps, tokens and wall time already spent on it."""
    digest = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    record = {"path": str(checkpoint), "model_sha256": digest}
    earlier = checkpoint / "train.json"
    if earlier.is_file():
        prior = json.loads(earlier.read_text())
        record.update({k: prior[k] for k in ("steps", "tokens", "wall_time_s") if k in prior})
        record["settings"] = prior.get("settings")
    return record


def plot_curve(curve: Curve, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, key, label, style in ((curve.train, "lm", "train", "-"), (curve.train, "mtp", "train MTP (t+2)", "-"),
                                      (curve.validation, "lm", "validation", "o-"),
                                      (curve.validation, "mtp", "validation MTP (t+2)", "o-")):
        xs = [p["tokens"] / 1e6 for p in points if p.get(key) is not None]
        ys = [p[key] for p in points if p.get(key) is not None]
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=3, linewidth=1)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
