"""Serving precisions: which weights (fp32 or INT8 W8A8) and which attention core (fp32 or PASA).

| name      | GEMMs               | attention core                 |
|-----------|---------------------|--------------------------------|
| fp32      | fp32                | exact fp32 softmax             |
| int8      | INT8 W8A8           | exact fp32 softmax             |
| pasa      | fp32                | PASA, fp16 throughout          |
| int8-pasa | INT8 W8A8           | PASA, fp16 throughout (paper)  |

Loading a checkpoint at a precision: cloudmatrix/checkpoints.py.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    int8_weights: bool
    attention_core: str


PRECISIONS = {
    "fp32": Precision("fp32", False, "fp32"),
    "int8": Precision("int8", True, "fp32"),
    "pasa": Precision("pasa", False, "pasa"),
    "int8-pasa": Precision("int8-pasa", True, "pasa"),
}


def parse_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]
