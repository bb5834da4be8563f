"""`cmx train`: the training loop over the project's own DeepseekV3 (the serving model definition).

Shape legend: B = batch, L = window length.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cloudmatrix.model.checkpoint import load_float_model, save_checkpoint
from cloudmatrix.model.presets import PRESETS
from cloudmatrix.model.tokenizer import BOS, EOS, save_tokenizer, train_bpe
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.train.corpus import Corpus, load_corpus
from cloudmatrix.train.data import eval_windows, token_stream, training_batch
from cloudmatrix.train.model_init import new_model
from cloudmatrix.train.objective import RouterTap, compute_losses, update_correction_bias
from cloudmatrix.train.report import Curve, write_report
from cloudmatrix.train.settings import TrainSettings
from cloudmatrix.train.state import has_state, load_state, save_state


@dataclasses.dataclass
class TrainData:
    corpus: Corpus
    tokenizer: object
    train: torch.Tensor  # [N] token ids
    validation: torch.Tensor  # [W, L + 1] fixed validation windows


def prepare_data(settings: TrainSettings, out: Path, corpus_root: Path | None, say: Callable[[str], None]) -> TrainData:
    """Corpus, tokenizer (trained on the train split, reloaded when resuming, or the --init-from
    checkpoint's) and token streams."""
    from tokenizers import Tokenizer
    corpus = load_corpus(corpus_root)
    cfg = PRESETS[settings.preset]
    tok_path = out / "tokenizer.json"
    if settings.init_from and not tok_path.is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(Path(settings.init_from) / name, out / name)
    if tok_path.is_file():
        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        say(f"training a {cfg.vocab_size}-id byte-level BPE on {len(corpus.files['train'])} files")
        tokenizer = train_bpe(corpus.texts("train"), cfg.vocab_size)
        save_tokenizer(tokenizer, out, cfg.max_position_embeddings)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    train = token_stream(tokenizer, corpus.texts("train"), bos, eos)
    val = token_stream(tokenizer, corpus.texts("validation"), bos, eos)
    return TrainData(corpus, tokenizer, train, eval_windows(val, settings.seq_len, settings.eval_windows))


def _optimizer(model: DeepseekV3, settings: TrainSettings) -> torch.optim.AdamW:
    params = list(model.named_parameters())
    groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2))


def _initial_model(settings: TrainSettings) -> DeepseekV3:
    """Fresh weights from (init_std, seed), or a trained checkpoint's (a continued run: the
    optimizer and the schedule start anew)."""
    cfg = PRESETS[settings.preset]
    if settings.init_from is None:
        return new_model(cfg, settings.init_std, settings.seed)
    model = load_float_model(settings.init_from, mtp=bool(cfg.num_nextn_predict_layers))
    if model.cfg != cfg:
        raise ValueError(f"--init-from {settings.init_from} is not a {settings.preset} model; pass its preset")
    return model.train()


def max_violation(load: torch.Tensor) -> float:
    """DeepSeek's MaxVio averaged over MoE layers: max load / mean load - 1. load: [M, E]."""
    load = load.float()
    return float((load.amax(-1) / load.mean(-1) - 1).mean())


class Trainer:
    """One run into ``out``: resumes from ``out/train_state`` when it is there."""

    def __init__(self, settings: TrainSettings, out: Path, corpus_root: Path | None = None,
                 say: Callable[[str], None] = print) -> None:
        if settings.preset not in PRESETS:
            raise ValueError(f"unknown preset {settings.preset!r}; choose one of {', '.join(PRESETS)}")
        self.settings, self.out, self.say = settings, Path(out), say
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(settings.threads)
        self.data = prepare_data(settings, self.out, corpus_root, say)
        self.model = _initial_model(settings)
        self.tap = RouterTap(self.model)
        self.optimizer = _optimizer(self.model, settings)
        self.curve = Curve()
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        if has_state(self.out):
            self._resume()

    def _resume(self) -> None:
        progress = load_state(self.out, self.model, self.optimizer)
        started = TrainSettings(**progress["settings"])
        if dataclasses.replace(started, minutes=None, tokens=1, threads=1) != dataclasses.replace(
                self.settings, minutes=None, tokens=1, threads=1):
            raise ValueError(f"{self.out} holds a run with other settings; pass the same ones or a new --out")
        self.step, self.tokens, self.elapsed = progress["step"], progress["tokens"], progress["elapsed_s"]
        self.curve = Curve.from_dict(progress["curve"])
        self.say(f"resumed at step {self.step} ({self.tokens / 1e6:.2f}M tokens, {self.elapsed / 60:.1f} min)")

    def run(self, stop_after_steps: int | None = None) -> dict:
        """Train until the budget is spent (or ``stop_after_steps`` more steps: an interruption
        that leaves a resumable state); returns the report written with the checkpoint."""
        s = self.settings
        last_save, last_step = time.monotonic(), None if stop_after_steps is None else self.step + stop_after_steps
        while (p := s.progress(self.tokens, self.elapsed)) < 1.0 and self.step != last_step:
            started = time.perf_counter()
            metrics = self._train_step(p)
            self.elapsed += time.perf_counter() - started
            self.step += 1
            self.tokens += s.tokens_per_step
            if self.step % s.log_every == 0:
                self.curve.add_train(self.step, self.tokens, self.elapsed, metrics)
                self._progress_line(metrics, p)
            if self.step % s.eval_every == 0:
                self._validate()
            if time.monotonic() - last_save > 60 * s.save_every_minutes:
                self.save()
                last_save = time.monotonic()
        if self.step != last_step:
            self._validate()
        return self.save()

    def _train_step(self, p: float) -> dict:
        s = self.settings
        lr = s.learning_rate(self.step, p)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        window = training_batch(self.data.train, s.batch_size, s.seq_len, s.seed, self.step)  # [B, L + 1]
        losses = compute_losses(self.model, self.tap, window)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total(s.mtp_weight_at(p), s.balance_alpha).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        update_correction_bias(self.tap, losses.expert_load, s.bias_speed_at(p))
        return {"lm": losses.lm.item(), "mtp": losses.mtp.item() if losses.mtp is not None else None,
                "balance": losses.balance.item(), "max_violation": max_violation(losses.expert_load),
                "grad_norm": float(grad_norm), "lr": lr}

    @torch.no_grad()
    def _validate(self) -> None:
        lm = mtp = 0.0
        windows = self.data.validation.split(self.settings.batch_size)
        for window in windows:
            losses = compute_losses(self.model, self.tap, window)
            lm += float(losses.lm)
            mtp += float(losses.mtp) if losses.mtp is not None else 0.0
        val = {"lm": lm / len(windows), "mtp": mtp / len(windows) if len(self.model.mtp) else None}
        self.curve.add_validation(self.step, self.tokens, val)
        self.say(f"  validation at step {self.step}: loss {val['lm']:.4f}"
                 + (f", MTP loss {val['mtp']:.4f}" if val["mtp"] is not None else ""))

    def _progress_line(self, m: dict, p: float) -> None:
        rate = self.tokens / max(self.elapsed, 1e-9)
        eta = self.elapsed * (1 - p) / max(p, 1e-9)
        bar = "#" * int(20 * p) + "." * (20 - int(20 * p))
        mtp = f" mtp {m['mtp']:.3f}" if m["mtp"] is not None else ""
        line = (f"[{bar}] {100 * p:5.1f}% step {self.step} {self.tokens / 1e6:.2f}M tok | loss {m['lm']:.3f}{mtp} "
                f"bal {m['balance']:.3f} maxvio {m['max_violation']:.2f} | lr {m['lr']:.2e} | "
                f"{rate:.0f} tok/s | ETA {eta / 60:.1f} min")
        self.say(line)

    def save(self) -> dict:
        """Resumable state, the Hugging Face checkpoint (export dtype), train.json and the loss PNG."""
        s = self.settings
        progress = {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed,
                    "settings": dataclasses.asdict(s), "curve": self.curve.to_dict()}
        save_state(self.out, self.model, self.optimizer, progress)
        save_checkpoint(self.model, self.out, dtype=s.export_dtype)
        return write_report(self.out, s, self.data.corpus, self.data.tokenizer, progress)


def default_say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
