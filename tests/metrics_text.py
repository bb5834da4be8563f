"""Read Prometheus text exposition in tests with prometheus_client's own parser."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` whose labels include ``labels``."""
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the matching samples (0 when there are none)."""
    return sum(v for _, v in samples(text, name, **labels))


def types(text: str) -> dict[str, str]:
    """Family name -> type (counter, gauge, histogram) as exposed."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}
