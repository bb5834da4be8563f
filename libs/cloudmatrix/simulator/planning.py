"""What-if questions over the simulator: the largest batch within a TPOT SLO, and how many NPUs
a request rate needs for prefill and for decode."""
from __future__ import annotations

import dataclasses
import math

from cloudmatrix.costmodel.die import DieEfficiency
from cloudmatrix.simulator.calibration import FITTED
from cloudmatrix.simulator.decode import DIES_PER_NPU, DecodeResult, DecodeSetup, largest_batch_within
from cloudmatrix.simulator.paper import mean_kv_len
from cloudmatrix.simulator.prefill import PrefillResult, PrefillSetup, simulate_prefill


def parse_duration_s(text: str) -> float:
    """'30ms', '0.03s', '30us' or a bare number of milliseconds -> seconds."""
    value = text.strip().lower()
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if value.endswith(suffix):
            number, unit = value[: -len(suffix)], scale
            break
    else:
        number, unit = value, 1e-3
    try:
        seconds = float(number) * unit
    except ValueError:
        raise ValueError(f"expected a duration like 30ms, 0.05s or 30, got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"a duration must be > 0, got {text!r}")
    return seconds


def prefill_setup_for(prompt: int, base: PrefillSetup) -> PrefillSetup:
    """``base`` with ``prompt``-token prompts, as many per die as fit its tokens per die (at least one)."""
    per_die = max(prompt, base.tokens_per_die // prompt * prompt)
    return dataclasses.replace(base, prompt_len=prompt, tokens_per_die=per_die)


@dataclasses.dataclass(frozen=True)
class Plan:
    rate: float                      # requests per second
    prompt: int
    output: int
    prefill: PrefillResult
    decode: DecodeResult

    @property
    def prefill_npus(self) -> int:
        return math.ceil(self.rate * self.prompt / self.prefill.tokens_per_s_per_npu)

    @property
    def decode_npus(self) -> int:
        return math.ceil(self.rate * self.output / self.decode.tokens_per_s_per_npu)

    @property
    def prefill_instances(self) -> int:
        return math.ceil(self.prefill_npus * DIES_PER_NPU / self.prefill.setup.dies)

    @property
    def decode_instances(self) -> int:
        return math.ceil(self.decode_npus * DIES_PER_NPU / self.decode.setup.dies)

    def as_dict(self) -> dict:
        return {"rate": self.rate, "prompt": self.prompt, "output": self.output,
                "prefill_tokens_per_s_per_npu": self.prefill.tokens_per_s_per_npu,
                "decode_batch_per_npu": DIES_PER_NPU * self.decode.setup.batch_per_die,
                "decode_tpot_ms": self.decode.tpot_s * 1e3,
                "decode_tokens_per_s_per_npu": self.decode.tokens_per_s_per_npu,
                "prefill_npus": self.prefill_npus, "decode_npus": self.decode_npus,
                "prefill_instances": self.prefill_instances, "decode_instances": self.decode_instances}


def plan(rate: float, prompt: int, output: int, tpot_slo_s: float, decode: DecodeSetup,
         prefill: PrefillSetup, eff: DieEfficiency = FITTED.efficiency()) -> Plan:
    """NPUs for ``rate`` requests/s of ``prompt`` + ``output`` tokens: prefill at its batch
    throughput, decode at the largest batch within the TPOT SLO (``ValueError`` if none meets it);
    operators at the calibrated efficiencies unless ``eff`` says otherwise."""
    if not rate > 0 or prompt < 1 or output < 1:
        raise ValueError(f"need rate > 0, prompt >= 1 and output >= 1; got {rate}, {prompt}, {output}")
    best = largest_batch_within(tpot_slo_s, dataclasses.replace(decode, kv_len=mean_kv_len(prompt, output)),
                                eff=eff)
    if best is None:
        raise ValueError(f"no decode batch meets a TPOT of {tpot_slo_s * 1e3:g} ms with this setup")
    return Plan(rate, prompt, output, simulate_prefill(prefill_setup_for(prompt, prefill), eff=eff), best)
