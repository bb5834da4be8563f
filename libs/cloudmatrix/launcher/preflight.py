"""Check a topology's inputs before any process starts: a mistake is one clear line from
`cmx up` (exit 2), not a traceback in a process log after the launch."""
from __future__ import annotations

from pathlib import Path

from cloudmatrix.launcher.topology import Topology


def problems(topology: Topology, run_dir: Path) -> list[str]:
    """What would stop a process from starting: missing config files, checkpoint directories
    without a config.json. One line per problem, naming the process and the field."""
    found, checkpoints = [], {}
    for spec in topology.processes:
        if spec.config is not None and not Path(spec.config).is_file():
            found.append(f"{spec.name}: config: no such file {spec.config}")
        for override in spec.overrides:
            key, _, value = override.partition("=")
            path = Path(value.replace("{run_dir}", str(run_dir)))
            if key == "checkpoint" and not (path / "config.json").is_file():
                checkpoints.setdefault(path, []).append(spec.name)
    for path, names in checkpoints.items():
        found.append(f"{', '.join(names)}: checkpoint: no config.json in {path} (make one with `cmx checkpoint "
                     f"create`, then `cmx quantize` for an INT8 one; `make run` makes the default topology's)")
    return found


def check(topology: Topology, run_dir: Path) -> None:
    """ValueError listing every problem (the CLI prints it and exits 2)."""
    found = problems(topology, run_dir)
    if found:
        raise ValueError("the topology cannot start:\n  " + "\n  ".join(found))
