"""Address lists with numbered ranges: ``kvcache-{0..2}.kvcache:50051`` stands for
``kvcache-0.kvcache:50051``, ``kvcache-1.kvcache:50051`` and ``kvcache-2.kvcache:50051``.

A StatefulSet's pods have such numbered DNS names, so one setting can name all of them, or every
instance up to an autoscaler's maximum (the gateway leaves out the ones that do not answer).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
MAX_RANGE = 1024


def expand_addresses(addresses: Iterable[str], field: str) -> tuple[str, ...]:
    """Each address with its ``{first..last}`` range (at most one) replaced by every number in
    it, in order; ValueError naming ``field`` for a reversed, huge or repeated range."""
    out: list[str] = []
    for address in addresses:
        match = _RANGE.search(address)
        if match is None:
            out.append(address)
            continue
        first, last = int(match.group(1)), int(match.group(2))
        if not first <= last < first + MAX_RANGE:
            raise ValueError(f"{field}: range {match.group(0)} in {address!r} must go up, by at most "
                             f"{MAX_RANGE} numbers")
        if _RANGE.search(address, match.end()):
            raise ValueError(f"{field}: {address!r} has more than one {{first..last}} range")
        head, tail = address[:match.start()], address[match.end():]
        out += [f"{head}{n}{tail}" for n in range(first, last + 1)]
    if len(set(out)) != len(out):
        raise ValueError(f"{field}: an address is listed twice in {', '.join(out)}")
    return tuple(out)
