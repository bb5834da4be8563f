"""A small synthetic Python corpus whose files land in every split (train, validation, test)."""
from __future__ import annotations

import random
from pathlib import Path

from cloudmatrix.train.corpus import split_of

_NAMES = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")


def _module(rng: random.Random) -> str:
    lines = ['"""A generated module."""', "", "import os", ""]
    for _ in range(rng.randint(6, 10)):
        name, arg = rng.choice(_NAMES), rng.choice(_NAMES)
        lines += [f"def {name}_{rng.randint(0, 99)}({arg}, count=0):",
                  f'    """Return {arg} after {rng.randint(1, 9)} steps."""',
                  "    for i in range(count):",
                  f"        {arg} = {arg} + i * {rng.randint(1, 9)}",
                  f"    return {arg}", ""]
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, per_split: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``per_split`` files in each split (default 12 train, 2 validation, 2 test), named so that
    the corpus's own split rule puts them there."""
    want = dict(per_split or {"train": 12, "validation": 2, "test": 2})
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    i = 0
    while any(want.values()):
        name = f"pkg/mod_{i}.py"
        split = split_of(name)
        if want.get(split):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(_module(rng))
            want[split] -= 1
        i += 1
    return root
