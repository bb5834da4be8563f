"""What a training run does: model, data, schedule, balancing and budget, in one frozen dataclass."""
from __future__ import annotations

import dataclasses
import math
import os


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Defaults are the shipped model's run (models/cmx-tiny-py/README.md). The MTP weight and the
    bias update speed follow the DeepSeek-V3 report (0.3 then 0.1 after ~2/3 of the tokens;
    0.001 until ~97% of the tokens, then 0; a sequence-wise balance loss of weight 1e-4)."""

    preset: str = "tiny-py"
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    mtp_weight_late: float = 0.1
    mtp_late_after: float = 10.0 / 14.8
    balance_alpha: float = 1e-4
    bias_speed: float = 1e-3
    bias_freeze_after: float = 14.3 / 14.8
    init_std: float = 0.02
    minutes: float | None = None
    tokens: int | None = None
    threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_windows: int = 16
    save_every_minutes: float = 5.0
    export_dtype: str = "bfloat16"
    init_from: str | None = None  # a trained checkpoint to continue from (weights and tokenizer)

    def __post_init__(self) -> None:
        if self.minutes is None and self.tokens is None:
            raise ValueError("give a budget: --minutes or --tokens")
        if (self.minutes is not None and self.minutes <= 0) or (self.tokens is not None and self.tokens <= 0):
            raise ValueError("--minutes and --tokens must be > 0")
        for name in ("seq_len", "batch_size", "threads", "log_every", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be in (0, 1) and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def progress(self, tokens: int, elapsed_s: float) -> float:
        """How much of the budget is spent, in [0, 1]: the larger of the time and token fractions."""
        fractions = []
        if self.minutes is not None:
            fractions.append(elapsed_s / (60 * self.minutes))
        if self.tokens is not None:
            fractions.append(tokens / self.tokens)
        return min(1.0, max(fractions))

    def learning_rate(self, step: int, progress: float) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine decay to min_lr_ratio * lr by the budget."""
        warm = min(1.0, (step + 1) / self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * warm * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def mtp_weight_at(self, progress: float) -> float:
        return self.mtp_weight if progress < self.mtp_late_after else self.mtp_weight_late

    def bias_speed_at(self, progress: float) -> float:
        return self.bias_speed if progress < self.bias_freeze_after else 0.0
