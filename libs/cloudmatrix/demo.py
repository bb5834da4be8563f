"""What `cmx demo` does against a running topology: find the gateway, stream completions over its
OpenAI-compatible HTTP API (measuring TTFT and TPOT at the client), and read a request's trace."""
from __future__ import annotations

import json
import time
import unicodedata
import urllib.request
from importlib import resources
from pathlib import Path


def gateway_url(run_dir: Path) -> str:
    """http://host:port of the first gateway `cmx up` started in run_dir."""
    files = sorted((run_dir / "ready").glob("gateway*.http.json"))
    if not files:
        raise FileNotFoundError(f"no gateway is running from {run_dir} (no ready/gateway*.http.json)")
    return f"http://127.0.0.1:{json.loads(files[0].read_text())['http_port']}"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def demo_prompts() -> list[tuple[str, str]]:
    """Openings of Python code (the shipped model learned the standard library): a short one,
    then two long ones sharing a ~40-line module prefix (the second hits the context cache)."""
    shared = resources.files("cloudmatrix.model").joinpath("data/demo_prefix.txt").read_text("utf-8")
    return [("short", 'def read_lines(path, encoding="utf-8"):\n    """'),
            ("long A", shared + "\n    def names(self):\n"),
            ("long B, shared prefix", shared + "\n    def __len__(self):\n")]


def _shown(c: str, keep: str) -> str:
    """A character as a terminal should get it: itself, or \\uXXXX when it is a control or other
    invisible character (except those in ``keep``)."""
    visible = c in keep or (c.isprintable() and not unicodedata.category(c).startswith("Z"))
    return c if visible else f"\\u{ord(c):04x}"


def printable(text: str) -> str:
    """Text a terminal shows as is: control and other invisible characters become \\uXXXX, in
    double quotes so that leading and trailing spaces show."""
    return '"' + "".join(_shown(c, " ") for c in text) + '"'


def code_block(text: str, indent: str = "    | ") -> str:
    """Generated code as indented lines: newlines and tabs kept, every other control or invisible
    character as \\uXXXX."""
    return "\n".join(indent + line for line in "".join(_shown(c, " \t\n") for c in text).split("\n"))


def stream_completion(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """POST /v1/completions with stream: true, greedy; returns text, id, usage, timing, TTFT, TPOT."""
    # Greedy (temperature 0; the OpenAI default is 1): the small model's most likely continuation.
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start, arrivals, text, last = time.perf_counter(), [], "", {}
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    arrivals.append(time.perf_counter() - start)
                    text += choice["text"]
            last = chunk if chunk.get("usage") else last
    tokens = max(last.get("usage", {}).get("completion_tokens", 1), 1)
    ttft = arrivals[0] if arrivals else time.perf_counter() - start
    tpot = (arrivals[-1] - ttft) / (tokens - 1) if arrivals and tokens > 1 else 0.0
    return {"id": last.get("id", ""), "text": text, "usage": last.get("usage", {}),
            "timing": last.get("timing", {"modeled_s": 0.0}), "ttft_s": ttft, "tpot_s": tpot}
