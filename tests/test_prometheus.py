"""A real Prometheus server (Debian's `prometheus` package) scraping the default topology through
the scrape config `cmx up` writes: the documented series are found by name through the HTTP query
API, typed, with `model_name`; so are the die and expert-load series; and every query of the
Grafana dashboard (dashboards/grafana/cmx-overview.json) is accepted and answers."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cloudmatrix.bench.compare import _topology
from cloudmatrix.launcher import prometheus
from cloudmatrix.launcher.bringup import bring_down, bring_up
from tests.metrics_text import scrape, value

pytestmark = pytest.mark.timeout(600)

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "grafana" / "cmx-overview.json"
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "cmx-tiny-py"
# Grafana's variables as this test sets them: every model, a rate window of a few 1 s scrapes
_VARIABLES = {"model_name": ".*", "__rate_interval": "10s", "__interval": "10s"}


def _prometheus_binary() -> str:
    """The server, installed from the Debian package when missing. Where that is impossible the
    test fails under CI (CI=true: the suite must check the dashboard) and skips elsewhere, saying why."""
    found = shutil.which("prometheus")
    if found is None and shutil.which("apt-get") is not None:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
                       capture_output=True, timeout=600, check=False)
        found = shutil.which("prometheus")
    if found is None:
        why = "no `prometheus` binary and it could not be installed with apt-get (Debian package)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _query(base: str, promql: str) -> list[dict]:
    return _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")["data"]["result"]


def _evaluate(base: str, promql: str) -> dict:
    """The query API's whole answer, an error's included (Prometheus answers a bad query with a 400)."""
    try:
        return _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def _scalar(base: str, promql: str) -> float:
    """A query's single value; 0 while it has no series yet."""
    result = _query(base, promql)
    return float(result[0]["value"][1]) if result else 0.0


def _wait(predicate, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The default topology serving the shipped model in fp32 (its MTP module speculates, so the
    speculative-decoding series exist too), scraped by a real Prometheus."""
    binary = _prometheus_binary()
    run_dir = tmp_path_factory.mktemp("prom-run").resolve()
    records = bring_up(_topology("topologies/local.yaml", SHIPPED, "fp32"), run_dir, 180.0)
    port = _free_port()
    server = None
    try:
        config = prometheus.write(run_dir, records, "local-default", scrape_interval_s=1.0)  # as `cmx up`, faster
        server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={run_dir / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=(run_dir / "prometheus.log").open("w"))
        base = f"http://127.0.0.1:{port}"
        assert _wait(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200), "not ready"
        yield base, records, SHIPPED.name
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        bring_down(run_dir, 10.0)


def _complete(records, model: str, n: int) -> None:
    info = json.loads(next((Path(r.ready_file).parent / f"{r.name}.http.json") for r in records
                           if r.service == "gateway").read_text())
    for i in range(n):
        body = json.dumps({"model": model, "prompt": f"Prometheus {i}", "max_tokens": 4, "ignore_eos": True})
        request = urllib.request.Request(f"http://127.0.0.1:{info['http_port']}/v1/completions", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200


def _all_targets_up(base: str, records) -> bool:
    """file_sd: every process of the run is found, and each is scraped."""
    targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
    return len(targets) == len(records) and all(t["health"] == "up" for t in targets)


def test_a_real_prometheus_finds_the_documented_series_typed_with_model_name(stack):
    base, records, model = stack
    assert _wait(lambda: _all_targets_up(base, records))
    _complete(records, model, 3)
    assert _wait(lambda: _scalar(base, "sum(cmx_time_to_first_token_seconds_count)") >= 3)
    for name in ("cmx_time_to_first_token_seconds_bucket", "cmx_inter_token_latency_seconds_count",
                 "cmx_generation_tokens_total", "cmx_prompt_tokens_total", "cmx_requests_total",
                 "cmx_num_requests_running", "cmx_kv_cache_usage_ratio", "cmx_engine_step_seconds_count",
                 "cmx_prefix_cache_queries_total", "cmx_die_forwards_total", "cmx_expert_tokens_total"):
        result = _query(base, name)
        assert result, f"{name}: no series"
        assert all(r["metric"].get("model_name") == model for r in result), (name, result[0]["metric"])
        assert not any("exported_instance" in r["metric"] for r in result), name  # no instance label of ours
    metadata = _get(f"{base}/api/v1/metadata")["data"]
    kinds = {name: entries[0]["type"] for name, entries in metadata.items()}
    assert kinds["cmx_time_to_first_token_seconds"] == "histogram"
    assert kinds["cmx_engine_step_seconds"] == "histogram" and kinds["cmx_requests"] == "counter"
    assert kinds["cmx_expert_tokens"] == "counter" and kinds["cmx_num_requests_running"] == "gauge"
    # 3 requests x 4 tokens, once a scrape after the last one has been stored
    assert _wait(lambda: _scalar(base, f'sum(cmx_generation_tokens_total{{model_name="{model}"}})') >= 12)
    per_die = "sum by (die) (cmx_expert_tokens_total)"
    assert _scalar(base, f"max({per_die}) / avg({per_die})") >= 1  # the expert-load imbalance query answers


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target, Grafana's variables substituted (an unknown one raises)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    def substitute(expr: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: _VARIABLES[m.group(1) or m.group(2)], expr)
    return [(p["title"], substitute(t["expr"])) for p in panels for t in p.get("targets", [])]


def test_every_grafana_dashboard_query_is_accepted_and_answers_once_requests_ran(stack):
    base, records, model = stack
    assert _wait(lambda: _all_targets_up(base, records))
    _complete(records, model, 3)
    # the requests have run once Prometheus holds the gateway's own count of the tokens they generated
    gateway = next(r for r in records if r.service == "gateway")
    generated = value(scrape(gateway.metrics_port), "cmx_generation_tokens_total", model_name=model)
    assert _wait(lambda: _scalar(base, f'sum(cmx_generation_tokens_total{{model_name="{model}"}})') >= generated >= 12)
    queries = _dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        answer = _evaluate(base, expr)
        assert answer["status"] == "success", (title, expr, answer.get("error"))
    silent = [(title, expr) for title, expr in queries if not _wait(lambda e=expr: _query(base, e), 60.0)]
    assert not silent, f"no series: {silent}"
    # the model_name variable's label_values(cmx_num_requests_running, model_name)
    names = _get(f"{base}/api/v1/label/model_name/values?"
                 f"{urllib.parse.urlencode({'match[]': 'cmx_num_requests_running'})}")["data"]
    assert model in names
