"""Turn one version of a CustomResourceDefinition into the JSON schema tests/k8s_render.py checks
custom resources with (tests/k8s_schemas/<group>_<version>_<Kind>.json; sources in its README.md).

    python -m tests.k8s_crd_schema CRD.yaml VERSION "SOURCE" > tests/k8s_schemas/GROUP_VERSION_KIND.json

What the API server does with a structural schema becomes plain JSON Schema: an object that lists
its properties and neither sets additionalProperties nor x-kubernetes-preserve-unknown-fields
refuses other fields (the server prunes them; kubectl's strict field validation refuses them), as
kubernetes-validate's strict mode does for built-in kinds; nullable admits null. apiVersion and
kind become constants, metadata the same small schema tests/k8s_schemas' PodMonitor has, and
status goes (manifests carry none). A pattern's inline flags move to its start (RE2 takes them
anywhere, Python's re only there). Descriptions and the x-kubernetes-* extensions are dropped (CEL
rules are not checked).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(node: dict) -> dict:
    """``node`` (an OpenAPI v3 structural schema, or part of one) as strict JSON Schema."""
    out = {key: value for key, value in node.items()
           if key not in ("description", "nullable") and not key.startswith("x-kubernetes-")}
    for key in ("items", "not", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = strict(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [strict(s) for s in node[key]]
    if "properties" in node:
        out["properties"] = {name: strict(s) for name, s in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "pattern" in node:  # ^(?i)x -> (?i)^x
        out["pattern"] = re.sub(r"^\^\(\?([a-z]+)\)", r"(?\1)^", node["pattern"])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_schema(crd: dict, version: str, source: str) -> dict:
    """The schema of ``crd``'s ``version`` for tests/k8s_schemas."""
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = served["schema"]["openAPIV3Schema"]
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    properties = {"apiVersion": {"const": f"{group}/{version}"}, "kind": {"const": kind}, "metadata": METADATA}
    properties |= {name: strict(s) for name, s in schema["properties"].items() if name not in (*properties, "status")}
    return {
        "$comment": f"{kind} ({group}/{version}) from {source}, converted by tests/k8s_crd_schema.py: "
                    "unknown fields are refused, as kubernetes-validate's strict mode does for built-in kinds.",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", *[r for r in schema.get("required", ()) if r != "status"]],
        "additionalProperties": False,
        "properties": properties,
    }


def dump(node, indent: int = 0, key_width: int = 0, width: int = 110) -> str:
    """JSON with every object or array that fits in ``width`` columns (its key included) on one line."""
    flat = json.dumps(node)
    if indent + key_width + len(flat) <= width or not isinstance(node, (dict, list)) or not node:
        return flat
    inner = " " * (indent + 2)
    if isinstance(node, dict):
        items = [f"{inner}{json.dumps(k)}: {dump(v, indent + 2, len(json.dumps(k)) + 2, width)}"
                 for k, v in node.items()]
    else:
        items = [inner + dump(v, indent + 2, 0, width) for v in node]
    brackets = "{}" if isinstance(node, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(items) + "\n" + " " * indent + brackets[1]


def main(argv: list[str]) -> None:
    path, version, source = argv
    crd = next(d for d in yaml.safe_load_all(Path(path).read_text()) if d)
    sys.stdout.write(dump(crd_schema(crd, version, source)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
