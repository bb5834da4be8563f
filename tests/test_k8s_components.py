"""k8s/components for the cluster conventions (docs/kubernetes-components.md): autoscaling's
behavior, keda, prometheus (namespace selector, rules), gateway-api. Each renders on top of the
dev overlay in a temporary overlay and every object passes strict validation (the custom resources
against the CRD schemas in tests/k8s_schemas); KEDA and an HPA never scale one workload; every
metric the rules and queries name is one the code exports, and Prometheus' own promtool evaluates
the alerts on synthetic series; the HTTPRoute and the InferencePool reach the gateway's HTTP port."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.k8s_render import CRD_SCHEMAS, K8S, OVERLAYS, ROOT, by_kind, pod_spec, render, rendered, validate
from tests.test_grafana_dashboard import SUFFIXES, _exported_names

pytestmark = pytest.mark.timeout(300)
ALONE = (("autoscaling",), ("keda",), ("prometheus",), ("gateway-api",))
TOGETHER = ("keda", "prometheus", "gateway-api")
CUSTOM = {"ScaledObject": "keda.sh_v1alpha1", "PrometheusRule": "monitoring.coreos.com_v1",
          "HTTPRoute": "gateway.networking.k8s.io_v1", "InferencePool": "inference.networking.k8s.io_v1"}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def _render_with(components: tuple[str, ...]) -> list[dict]:
    """The dev overlay plus ``components``, as an overlay that lists them would render it."""
    with tempfile.TemporaryDirectory() as directory:
        overlay = Path(directory)
        paths = [os.path.relpath(K8S / "components" / c, overlay) for c in components]
        (overlay / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: cmx-dev\n"
            f"resources: [{os.path.relpath(K8S / 'overlays' / 'dev', overlay)}]\ncomponents: [{', '.join(paths)}]\n")
        return render(overlay)


@cache
def with_components(*components: str) -> tuple[dict, ...]:
    return tuple(_render_with(components))


def _renderings() -> list[tuple[dict, ...]]:
    return [*(rendered(o) for o in OVERLAYS), *(with_components(*c) for c in ALONE), with_components(*TOGETHER)]


def _one(objects, kind: str) -> dict:
    (obj,) = by_kind(objects, kind).values()
    return obj


@pytest.mark.parametrize("components", [*ALONE, TOGETHER], ids="+".join)
def test_each_component_renders_on_the_dev_overlay_and_every_object_passes_strict_validation(components):
    objects = with_components(*components)
    expected = {"autoscaling": {"HorizontalPodAutoscaler"}, "keda": {"ScaledObject"},
                "prometheus": {"PodMonitor", "PrometheusRule"}, "gateway-api": {"HTTPRoute", "InferencePool"}}
    assert set().union(*(expected[c] for c in components)) <= {o["kind"] for o in objects}
    for obj in objects:
        validate(obj)
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "cmx-dev", obj["metadata"]["name"]


@pytest.mark.parametrize(("kind", "within", "field"), [
    ("ScaledObject", lambda spec: spec["advanced"]["horizontalPodAutoscalerConfig"], "behaviour"),
    ("PrometheusRule", lambda spec: spec["groups"][1]["rules"][0], "exprs"),
    ("HTTPRoute", lambda spec: spec["rules"][0]["backendRefs"][0], "prot"),
    ("InferencePool", lambda spec: spec, "targetPort"),
])
def test_a_misspelled_field_in_each_custom_resource_fails_its_crd_schema(kind, within, field):
    assert (CRD_SCHEMAS / f"{CUSTOM[kind]}_{kind}.json").is_file()  # checked by its schema, not by chance
    obj = next(o for o in with_components(*TOGETHER) if o["kind"] == kind)
    bad = yaml.safe_load(yaml.safe_dump(obj))
    within(bad["spec"])[field] = 1
    with pytest.raises(jsonschema.ValidationError, match=f"'{field}' was unexpected"):
        validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(obj))
    bad["spec"] = "not an object"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def _behaviors(objects) -> dict[str, dict]:
    hpas = {f"hpa/{n}": h["spec"]["behavior"] for n, h in by_kind(objects, "HorizontalPodAutoscaler").items()}
    return hpas | {f"keda/{n}": s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
                   for n, s in by_kind(objects, "ScaledObject").items()}


def test_every_autoscaler_scales_up_within_a_minute_and_down_over_five_in_bounded_steps():
    behaviors = _behaviors(rendered("supernode-slice")) | _behaviors(with_components("keda"))
    assert set(behaviors) == {"hpa/prefill", "hpa/decode", "keda/prefill", "keda/decode"}
    for name, behavior in behaviors.items():
        up, down = behavior["scaleUp"], behavior["scaleDown"]
        assert 0 < up["stabilizationWindowSeconds"] <= 60 and down["stabilizationWindowSeconds"] >= 300, name
        for direction in (up, down):  # whole pods per period: an instance is one pod
            assert direction["policies"] and direction.get("selectPolicy") != "Disabled", name
            assert all(p["type"] == "Pods" and 1 <= p["value"] <= 2 for p in direction["policies"]), name
        assert down["policies"][0]["value"] == 1, name
    assert len({yaml.safe_dump(b) for b in behaviors.values()}) == 1  # the HPA and KEDA alternatives agree


def _targets(objects) -> tuple[set, set]:
    hpa = {(h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
           for h in by_kind(objects, "HorizontalPodAutoscaler").values()}
    keda = {(s["spec"]["scaleTargetRef"].get("kind", "Deployment"), s["spec"]["scaleTargetRef"]["name"])
            for s in by_kind(objects, "ScaledObject").values()}
    return hpa, keda


def test_keda_and_an_hpa_never_scale_the_same_workload_and_the_pair_of_components_does_not_render():
    for objects in _renderings():
        hpa, keda = _targets(objects)
        assert not hpa & keda
    assert _targets(with_components("keda")) == (set(), {("StatefulSet", "prefill"), ("StatefulSet", "decode")})
    with pytest.raises(AssertionError, match="replicas"):  # both remove them: kustomize refuses the second
        _render_with(("autoscaling", "keda"))


def test_a_workload_keda_scales_exists_carries_no_replicas_and_is_queried_in_its_own_namespace():
    objects = with_components("keda")
    statefulsets = by_kind(objects, "StatefulSet")
    for name, scaled in by_kind(objects, "ScaledObject").items():
        assert "replicas" not in statefulsets[name]["spec"]
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= 8  # gateway's {0..7}
        for trigger in scaled["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert {"serverAddress", "query", "threshold"} <= set(meta) and meta["ignoreNullValues"] == "false"
            assert f'namespace="cmx-dev", pod=~"{name}-[0-9]+"' in meta["query"]  # the replacement filled it in
            float(meta["threshold"])
    assert "replicas" in by_kind(rendered("dev"), "StatefulSet")["prefill"]["spec"]  # dev alone keeps them


def _expressions(objects) -> list[str]:
    rules = [r for p in by_kind(objects, "PrometheusRule").values() for g in p["spec"]["groups"] for r in g["rules"]]
    queries = [t["metadata"]["query"] for s in by_kind(objects, "ScaledObject").values() for t in s["spec"]["triggers"]]
    return [r["expr"] for r in rules] + queries


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions and keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values and strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # matchers and ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\b[a-z_]+\s*\(", "(", expr)  # function and aggregation names
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in PROMQL_KEYWORDS}


def _unknown(names: set[str], exported: set[str], recorded: set[str]) -> list[str]:
    """Names neither exported by the code (a counter's _total, a histogram's _bucket...), nor recorded
    by the rules themselves, nor Prometheus' own ``up``."""
    return sorted(n for n in names - recorded - {"up"}
                  if not ({n} | {n.removesuffix(s) for s in SUFFIXES}) & exported)


def test_every_metric_a_rule_or_a_keda_query_names_is_exported_by_the_code():
    objects = with_components(*TOGETHER)
    rules = [r for p in by_kind(objects, "PrometheusRule").values() for g in p["spec"]["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    named = set().union(*map(metric_names, _expressions(objects)))
    assert {"up", "cmx_num_preemptions_total", "cmx_kvcache_leased_blocks", "cmx_num_requests_waiting"} <= named
    assert not {"namespace", "model_name", "sum", "rate", "le"} & named  # the extraction keeps only metrics
    exported = _exported_names()
    assert _unknown(named, exported, recorded) == []
    assert recorded <= named  # every recording rule feeds an alert
    assert _unknown({"cmx_num_preemption_total", "cmx:not_recorded"}, exported, recorded) == \
        ["cmx:not_recorded", "cmx_num_preemption_total"]  # the check can fail


def _histogram_buckets(name: str) -> set[float]:
    """The bucket bounds of the prometheus_client Histogram the sources create as ``name``."""
    for path in [*(ROOT / "services").rglob("*.py"), *(ROOT / "libs" / "cloudmatrix").rglob("*.py")]:
        if f'"{name}"' not in (text := path.read_text()):
            continue
        tree = ast.parse(text)
        constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                     if isinstance(t, ast.Name)}
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Histogram" and call.args \
                    and getattr(call.args[0], "value", None) == name:
                buckets = next(k.value for k in call.keywords if k.arg == "buckets")
                return {float(b) for b in ast.literal_eval(constants.get(getattr(buckets, "id", ""), buckets))}
    raise AssertionError(f"no Histogram {name!r} under services/ or libs/cloudmatrix/")


def test_every_slo_threshold_is_a_bucket_bound_of_its_histogram():
    """A `le` the histogram does not have selects no series: the alert could never fire."""
    pairs = {(m, float(le)) for e in _expressions(with_components("prometheus"))
             for m, le in re.findall(r'\b(\w+)_bucket\{[^}]*le="([^"]+)"', e)}
    assert {m for m, _ in pairs} == {"cmx_time_to_first_token_seconds", "cmx_inter_token_latency_seconds"}
    for metric, le in pairs:
        assert le in _histogram_buckets(metric), (metric, le)
    assert 2.0 not in _histogram_buckets("cmx_time_to_first_token_seconds")  # why TTFT's SLO is 2.5 s


def _series(name: str, values: str, **labels: str) -> dict:
    body = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _firing(alert: str, at: str, *expected: dict) -> dict:
    samples = [{"labels": "ALERTS{" + ", ".join(f'{k}="{v}"' for k, v in
                                              {"alertname": alert, "alertstate": "firing", **labels}.items()) + "}",
                "value": 1} for labels in expected]
    return {"expr": f'ALERTS{{alertname="{alert}", alertstate="firing"}}', "eval_time": at, "exp_samples": samples}


# Synthetic targets as the PodMonitor labels them: a slow and a healthy model at the gateway, a
# kvcache shard full of leased blocks and one whose blocks are evictable, a decode instance in
# trouble and a healthy one.
TARGET = {"namespace": "cmx-dev", "job": "cmx-dev/cloudmatrix-infer", "endpoint": "metrics"}
SLOW, OK = ({**TARGET, "pod": "gateway-0", "model_name": m} for m in ("slow", "ok"))
SHARD = {**TARGET, "container": "kvcache"}
DECODE_0, DECODE_1 = ({**TARGET, "pod": f"decode-{i}", "model_name": "m", "engine": f"decode-{i}"} for i in (0, 1))


def _synthetic_series() -> list[dict]:
    """20 minutes of samples, one every 30 s ("a+bxN": from a, b more each step)."""
    ttft, itl = "cmx_time_to_first_token_seconds", "cmx_inter_token_latency_seconds"
    shards = [_series(name, values, **SHARD, pod=pod, **extra)
              for pod, used, leased in (("kvcache-0", 99, 95), ("kvcache-1", 99, 10))
              for name, values, extra in (("cmx_kvcache_used_bytes", f"{used}x40", {"tier": "memory"}),
                                          ("cmx_kvcache_capacity_bytes", "100x40", {"tier": "memory"}),
                                          ("cmx_kvcache_keys", "100x40", {"tier": "memory"}),
                                          ("cmx_kvcache_leased_blocks", f"{leased}x40", {}))]
    return [
        _series("up", "1 1 0x40", **TARGET, pod="decode-0", container="decode"),
        _series("up", "1x40", **TARGET, pod="decode-1", container="decode"),
        _series("up", "0x40", namespace="cmx-dev", job="cmx-dev/another-monitor", pod="x"),
        _series(f"{ttft}_count", "0+10x40", **SLOW), _series(f"{ttft}_bucket", "0+5x40", **SLOW, le="2.5"),
        _series(f"{ttft}_count", "0+10x40", **OK), _series(f"{ttft}_bucket", "0+10x40", **OK, le="2.5"),
        _series(f"{itl}_count", "0+100x40", **SLOW), _series(f"{itl}_bucket", "0+20x40", **SLOW, le="0.25"),
        _series(f"{itl}_count", "0+100x40", **OK), _series(f"{itl}_bucket", "0+100x40", **OK, le="0.25"),
        *shards,
        _series("cmx_num_preemptions_total", "0+30x40", **DECODE_0),
        _series("cmx_num_preemptions_total", "0+1x40", **DECODE_1),
        _series("cmx_kv_cache_usage_ratio", "0.99x40", **DECODE_0),
        _series("cmx_kv_cache_usage_ratio", "0.9x40", **DECODE_1),
    ]


def _expected_alerts() -> list[dict]:
    model = {"namespace": "cmx-dev", "model_name": "slow"}
    return [
        _firing("CmxTargetDown", "3m"),  # down since 60 s: pending for 3 minutes
        _firing("CmxTargetDown", "5m", {**TARGET, "pod": "decode-0", "container": "decode", "severity": "warning"}),
        _firing("CmxTimeToFirstTokenBudgetBurnFast", "1m"),
        _firing("CmxTimeToFirstTokenBudgetBurnFast", "10m", {**model, "severity": "critical"}),
        _firing("CmxTimePerOutputTokenBudgetBurnFast", "10m", {**model, "severity": "critical"}),
        _firing("CmxTimePerOutputTokenBudgetBurnSlow", "10m"),  # pending for 15 minutes
        _firing("CmxTimePerOutputTokenBudgetBurnSlow", "19m", {**model, "severity": "warning"}),
        _firing("CmxKvPoolNearFull", "10m", {**SHARD, "pod": "kvcache-0", "tier": "memory", "severity": "warning"}),
        _firing("CmxPreemptionStorm", "15m", {**DECODE_0, "severity": "warning"}),
        _firing("CmxInstanceKvCacheNearFull", "15m", {**DECODE_0, "severity": "warning"}),
    ]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_promtool_accepts_the_rules_and_each_alert_fires_on_its_condition_only(tmp_path):
    """Prometheus evaluates the rules on synthetic series: each alert fires for the pod or model in
    trouble (after its `for`), and not for its healthy neighbour or another job's pod."""
    rule = _one(with_components("prometheus"), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "30s",
            "tests": [{"interval": "30s", "input_series": _synthetic_series(), "promql_expr_test": _expected_alerts()}]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit))
    for command in (["check", "rules", "rules.yaml"], ["test", "rules", "test.yaml"]):
        run = subprocess.run(["promtool", *command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_podmonitor_scrapes_its_own_namespace_and_kube_prometheus_stack_selects_it_and_the_rules(overlay):
    objects = rendered(overlay)
    if not by_kind(objects, "PodMonitor"):
        assert not by_kind(objects, "PrometheusRule")  # rules come with the monitor, or not at all
        return
    monitor, rule = _one(objects, "PodMonitor"), _one(objects, "PrometheusRule")
    assert monitor["spec"]["namespaceSelector"] == {"any": False}  # no matchNames: its own namespace only
    assert monitor["metadata"]["namespace"] == rule["metadata"]["namespace"] == "cmx-slice"
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert f'job=~".+/{monitor["metadata"]["name"]}"' in rule["spec"]["groups"][1]["rules"][0]["expr"]


def test_the_httproute_and_the_inferencepool_reach_the_gateways_http_port_and_only_its_pods():
    objects = with_components("gateway-api")
    route, pool = _one(objects, "HTTPRoute"), _one(objects, "InferencePool")
    service = by_kind(objects, "Service")["gateway"]
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "gateway", "port": http["port"]}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]  # not /metrics, /health
    assert route["spec"]["parentRefs"][0]["kind"] == "Gateway"
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
    selector = pool["spec"]["selector"]["matchLabels"]
    labels = {n: w["spec"]["template"]["metadata"]["labels"] for n, w in workloads.items()}
    assert [n for n in workloads if selector.items() <= labels[n].items()] == ["gateway"]
    container = next(c for c in pod_spec(workloads["gateway"])["containers"] if c["name"] == "gateway")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert pool["spec"]["targetPorts"] == [{"number": ports["http"]}] and http["targetPort"] == "http"
