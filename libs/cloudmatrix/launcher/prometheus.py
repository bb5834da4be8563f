"""What a Prometheus server needs to scrape a run: a ``file_sd`` target file listing every
process's metrics endpoint, and a minimal ``prometheus.yml`` that reads it.

`cmx up` writes both into the run directory, so one command starts a Prometheus on any run:

    prometheus --config.file=runs/local/prometheus.yml --storage.tsdb.path=runs/local/prometheus-data

The target file is rewritten on every `cmx up` (ports change), and Prometheus reloads it by
itself (file_sd watches the file).
"""
from __future__ import annotations

import json
from pathlib import Path

from cloudmatrix.launcher.processes import ProcessRecord

TARGETS_FILE = "prometheus_targets.json"
CONFIG_FILE = "prometheus.yml"


def targets(records: list[ProcessRecord], topology: str) -> list[dict]:
    """One file_sd group per process: its metrics endpoint, labelled with its service and name
    (``cmx_process``: Prometheus' own ``instance`` label stays host:port)."""
    return [{"targets": [f"{r.host or '127.0.0.1'}:{r.metrics_port}"],
             "labels": {"job": "cmx", "cmx_topology": topology, "cmx_service": r.service, "cmx_process": r.name}}
            for r in records if r.metrics_port]


def write(run_dir: Path, records: list[ProcessRecord], topology: str, scrape_interval_s: float = 5.0) -> Path:
    """Write the target file and the config next to it; returns the config's path."""
    (run_dir / TARGETS_FILE).write_text(json.dumps(targets(records, topology), indent=2) + "\n")
    config = run_dir / CONFIG_FILE
    config.write_text(
        "# Written by `cmx up`: scrape every process of this run (docs/launcher.md, Prometheus).\n"
        "global:\n"
        f"  scrape_interval: {scrape_interval_s:g}s\n"
        "scrape_configs:\n"
        "  - job_name: cmx\n"
        "    file_sd_configs:\n"
        f"      - files: [{json.dumps(str((run_dir / TARGETS_FILE).resolve()))}]\n")
    return config
