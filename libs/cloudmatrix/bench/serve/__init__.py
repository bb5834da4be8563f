"""`cmx bench serve`: a load generator for the gateway's OpenAI API (see docs/benchmarks.md)."""
from cloudmatrix.bench.serve.command import register

__all__ = ["register"]
