"""`cmx eplb`: plan redundant experts and their dies from expert-load counts (docs/eplb.md)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cloudmatrix.moe.eplb import balance, layer_imbalance, zipf_counts
from cloudmatrix.moe.placement import ExpertPlacement


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eplb", help="balance expert load over dies with redundant experts")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--stats", nargs="+", metavar="FILE",
                        help='GetExpertLoad JSON {"token_counts": [[...]], "layers": [...]}; several files are summed')
    source.add_argument("--zipf", metavar="LAYERS,EXPERTS,TOKENS", help="a synthetic Zipf routing trace instead")
    source.add_argument("--from-dies", metavar="ENTRY",
                        help="the live counters of a running topology entry's dies (e.g. decode-die), summed")
    parser.add_argument("--run-dir", default="runs/local", help="with --from-dies: the run directory `cmx up` used")
    parser.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent (larger = more skewed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --zipf trace")
    parser.add_argument("--dies", type=int, required=True)
    parser.add_argument("--redundant", type=int, default=0, help="extra expert replicas per layer")
    parser.add_argument("--experts-per-die-cap", type=int, default=None,
                        help="most replicas per die (default: ceil((experts + redundant) / dies))")
    parser.add_argument("--placement", help="current placement JSON (default: round-robin, expert e on die e %% N)")
    parser.add_argument("--out", help="write the balanced placement JSON here")
    parser.set_defaults(handler=_eplb)


def _eplb(args: argparse.Namespace) -> int:
    if args.from_dies:
        layers, counts = _read_dies(Path(args.run_dir), args.from_dies)
    else:
        layers, counts = _read_stats(args.stats) if args.stats else _zipf(args.zipf, args.zipf_s, args.seed)
    current = _current_placement(args.placement, layers, counts.shape[1], args.dies)
    planned = balance(counts, args.dies, args.redundant, layers=layers, experts_per_die_cap=args.experts_per_die_cap)
    before = layer_imbalance(current, counts, layers)  # [L]
    after = layer_imbalance(planned, counts, layers)  # [L]
    _print_table(layers, before, after)
    if args.out:
        Path(args.out).write_text(json.dumps(planned.to_json()) + "\n")
        print(f"wrote placement ({args.dies} dies, {args.redundant} redundant per layer) to {args.out}")
    return 0


def _read_stats(paths: list[str]) -> tuple[list[int], torch.Tensor]:
    """Sum the per-die counts: -> (layer ids, counts [L, E] int64)."""
    layers, total = None, None
    for path in paths:
        raw = json.loads(Path(path).read_text())
        try:
            counts = torch.tensor(raw["token_counts"], dtype=torch.int64)  # [L, E]
            ids = [int(layer) for layer in raw.get("layers", range(counts.shape[0]))]
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: expected {{\"token_counts\": [[...]], \"layers\": [...]}} ({exc})") from exc
        if counts.dim() != 2 or len(ids) != counts.shape[0]:
            raise ValueError(f"{path}: token_counts must be [layers, experts] with one row per layer id "
                             f"(got shape {tuple(counts.shape)} for {len(ids)} layers)")
        if total is not None and (ids != layers or counts.shape != total.shape):
            raise ValueError(f"{path}: layers {ids} / shape {tuple(counts.shape)} differ from the first file's "
                             f"{layers} / {tuple(total.shape)}")
        layers, total = ids, counts if total is None else total + counts
    return layers, total


def _read_dies(run_dir: Path, entry: str) -> tuple[list[int], torch.Tensor]:
    """Sum the GetExpertLoad counters of every die of ``entry`` in a running topology."""
    import asyncio

    from cloudmatrix.clients.npu import NpuClient
    from cloudmatrix.launcher.processes import load_state, run_tls
    from cloudmatrix.launcher.waves import entry_of
    from cloudmatrix.rpc.tls import use_process_tls
    use_process_tls(run_tls(run_dir))
    dies = [r.address for r in load_state(run_dir) if r.service == "npu_emulator" and entry_of(r.name) == entry]
    if not dies:
        raise ValueError(f"{run_dir} runs no npu_emulator processes of entry {entry!r}")

    async def read(address: str):
        async with NpuClient(address) as die:
            return await die.expert_load()

    async def read_all():
        return await asyncio.gather(*(read(d) for d in dies))

    loads = asyncio.run(read_all())
    if any(load.layers != loads[0].layers for load in loads):
        raise ValueError(f"the dies of {entry!r} count different layers: {[load.layers for load in loads]}")
    return list(loads[0].layers), sum(load.token_counts for load in loads)


def _zipf(spec: str, s: float, seed: int) -> tuple[list[int], torch.Tensor]:
    try:
        num_layers, experts, tokens = (int(v) for v in spec.split(","))
    except ValueError as exc:
        raise ValueError(f"--zipf {spec!r}: expected LAYERS,EXPERTS,TOKENS, e.g. 3,64,100000") from exc
    return list(range(num_layers)), zipf_counts(num_layers, experts, tokens, s=s, seed=seed)


def _current_placement(path: str | None, layers: list[int], num_experts: int, num_dies: int) -> ExpertPlacement:
    if path is None:
        return ExpertPlacement.round_robin(layers, num_experts, num_dies)
    current = ExpertPlacement.load(path)
    if current.num_experts != num_experts or not set(layers) <= set(current.layers):
        raise ValueError(f"--placement {path}: has {current.num_experts} experts and layers {current.layers}; "
                         f"the counts have {num_experts} experts and layers {layers}")
    return current


def _print_table(layers: list[int], before: torch.Tensor, after: torch.Tensor) -> None:
    print("max/mean die load")
    print(f"{'LAYER':>7} {'BEFORE':>8} {'AFTER':>8}")
    for layer, b, a in zip(layers, before.tolist(), after.tolist()):
        print(f"{layer:>7} {b:>8.3f} {a:>8.3f}")
    print(f"{'mean':>7} {before.mean().item():>8.3f} {after.mean().item():>8.3f}")
