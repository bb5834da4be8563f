"""The request vocabulary every layer shares, from the OpenAI API to the dies (vLLM's
``SamplingParams`` and ``FinishReason``): how to pick tokens, when to stop, and why a request
ended. One set of defaults and one validation; the proto converters are in rpc/sampling.py.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import secrets

import torch

from cloudmatrix.errors import FieldError

# An unset max_tokens, on every path: OpenAI's default for /v1/completions (and this server's for
# chat), the gateway's and the instances' gRPC APIs (max_tokens 0 = unset) and `cmx generate`.
DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20  # alternatives per token, at most (OpenAI's chat top_logprobs limit)
_SEED_LIMIT = 2**64


class FinishReason(str, enum.Enum):
    """Why a request ended; the values are the OpenAI API's ``finish_reason`` strings."""

    STOP = "stop"              # EOS, a stop token or a stop string
    LENGTH = "length"          # max_tokens, or the model's context is full
    CANCELLED = "cancelled"    # the client cancelled it or went away
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off. ``max_tokens``
    counts every completion token, the first (which prefill samples) included. ``stop`` strings
    are matched on the detokenized text (by the gateway); the token rules (EOS unless
    ``ignore_eos``, ``stop_token_ids``) by ``StopRule`` wherever a token is sampled."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None          # each sampled token's log-probability and this many top
                                         # alternatives (None: none)
    prompt_logprobs: int | None = None   # the same for every prompt token after the first (echo)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not self.temperature >= 0:
            raise FieldError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise FieldError("top_k", f"must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < _SEED_LIMIT:
            raise FieldError("seed", f"must be in [0, 2^64), got {self.seed}")
        if self.max_tokens < 1:
            raise FieldError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise FieldError("stop", "stop strings must be non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise FieldError("stop_token_ids", "must be token ids (integers >= 0)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise FieldError(name, f"must be in [0, {MAX_LOGPROBS}], got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, position: int) -> torch.Generator:
        """The generator for the token sampled at ``position``: a function of (seed, position) only,
        so a sequence samples the same tokens whichever process or die runs each step."""
        if self.seed is None:
            return torch.Generator().manual_seed(secrets.randbits(63))
        digest = hashlib.sha256(f"{self.seed}:{position}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a request finishes on a sampled token: at EOS (unless ignored) or a stop token
    (STOP), after ``max_new_tokens`` completion tokens or when its tokens fill the context
    (LENGTH). The gateway, prefill and decode all ask this rule."""

    max_new_tokens: int
    eos_token_id: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    context_limit: int = 2**31

    @classmethod
    def of(cls, params: SamplingParams, eos_token_id: int | None, context_limit: int = 2**31) -> StopRule:
        return cls(params.max_tokens, eos_token_id, frozenset(params.stop_token_ids), params.ignore_eos,
                   context_limit)

    def reason(self, token: int, new_tokens: int, total_tokens: int) -> FinishReason | None:
        """After ``token``, the ``new_tokens``-th completion token, with ``total_tokens`` in all."""
        if token == self.eos_token_id and not self.ignore_eos or token in self.stop_token_ids:
            return FinishReason.STOP
        if new_tokens >= self.max_new_tokens or total_tokens >= self.context_limit:
            return FinishReason.LENGTH
        return None


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model (log-softmax of the served precision's logits,
    before temperature and filters) and the ``top`` most likely (token id, log-probability)
    pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

