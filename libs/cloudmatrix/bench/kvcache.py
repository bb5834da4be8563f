"""`cmx bench kvcache`: raw gRPC streaming throughput, Put/Get through the pool client (vs raw),
Lookup latency, and model load time from the pool vs from disk. Everything side by side, one run."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cloudmatrix.bench.kvcache_load import bench_model_load
from cloudmatrix.bench.sink import MAX_MESSAGE, SERVICE
from cloudmatrix.bench.timing import write_report
from cloudmatrix.kv.hashing import namespace, prefix_keys
from cloudmatrix.kvcache import Block, KvPoolClient
from cloudmatrix.launcher.processes import spawn, stop_all, wait_healthy
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.rpc.channel import health_check_sync, make_channel
from cloudmatrix.rpc.tensor_codec import encode_tensor


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("kvcache", help="raw gRPC streaming vs the pool client, Lookup latency, model load")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller blocks; tiny preset for model load")
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--block-kib", type=int, default=256, help="bytes of one KV block")
    parser.add_argument("--repeats", type=int, default=5,
                        help="raw and pool throughput are measured this many times, interleaved; medians reported")
    parser.add_argument("--out", default="runs/bench")
    parser.set_defaults(handler=run)


@contextlib.contextmanager
def _processes(run_dir: Path, specs: list[ProcessSpec]):
    started = [spawn(s, run_dir) for s in specs]
    try:
        wait_healthy(started, health_check_sync, timeout_s=60)
        yield [r.address for _, r in started]
    finally:
        stop_all([r for _, r in started], grace_s=5)


@contextlib.contextmanager
def _raw_server(run_dir: Path, kind: str):
    port_file = run_dir / f"sink-{kind}.port"
    proc = subprocess.Popen([sys.executable, "-m", "cloudmatrix.bench.sink", str(port_file), kind])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("raw gRPC sink did not start")
            time.sleep(0.05)
        yield f"127.0.0.1:{port_file.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _raw_mbps(address: str, count: int, size: int) -> tuple[float, float]:
    chunk = b"\xa5" * size
    async with make_channel(address, max_message_bytes=MAX_MESSAGE) as channel:
        sink = channel.stream_unary(f"/{SERVICE}/Sink")
        source = channel.unary_stream(f"/{SERVICE}/Source")
        start = time.perf_counter()
        await sink(iter([chunk] * count))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        received = 0
        async for part in source(size.to_bytes(8, "little") + count.to_bytes(8, "little")):
            received += len(part)
        get_s = time.perf_counter() - start
    return count * size / put_s / 1e6, received / get_s / 1e6


def _blocks(count: int, size: int, model: str = "bench") -> list[Block]:
    ns = namespace(model, "float32", 16, "fp32")
    keys = prefix_keys(list(range(16 * count)), 16, ns).full
    tensor = encode_tensor(torch.randn(size // 4 - 8)).SerializeToString()
    return [Block(k, ns, "full", 16, tensor) for k in keys]


async def _client_mbps(shards: list[str], blocks: list[Block], replication: int) -> tuple[float, float]:
    async with KvPoolClient(shards, replication=replication, deadline_s=60.0) as client:
        start = time.perf_counter()
        results = await client.put_blocks(blocks)
        put_s = time.perf_counter() - start
        failed = [r for r in results if not r.acknowledged]
        if failed:
            raise RuntimeError(f"benchmark put was not acknowledged: {failed[0].errors}")
        start = time.perf_counter()
        got = await client.get_blocks([b.key for b in blocks])
        get_s = time.perf_counter() - start
    nbytes = sum(len(b.data) for b in blocks)
    assert all(got[b.key] is not None for b in blocks)
    return nbytes / put_s / 1e6, nbytes / get_s / 1e6


async def _lookup_latency(shards: list[str], blocks: list[Block], calls: int) -> dict:
    keys = [b.key for b in blocks[:64]]
    async with KvPoolClient(shards, replication=min(2, len(shards))) as client:
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            await client.lookup(keys)
            samples.append(time.perf_counter() - start)
    samples.sort()
    return {"keys": len(keys), "p50_s": statistics.median(samples), "p99_s": samples[int(0.99 * (len(samples) - 1))]}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    count, size = (40, 64 * 1024) if args.quick else (args.blocks, args.block_kib * 1024)
    blocks = _blocks(count, size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shard_specs = [ProcessSpec(f"kv{i}", "kvcache", "127.0.0.1", 0, None,
                                   (f"server.max_message_bytes={MAX_MESSAGE}", "capacity_bytes=2147483648"))
                       for i in range(3)]
        with _raw_server(tmp, "threads") as raw, _raw_server(tmp, "aio") as raw_aio, \
                _processes(tmp, shard_specs) as shards:
            runs = [(asyncio.run(_raw_mbps(raw, count, size)), asyncio.run(_raw_mbps(raw_aio, count, size)),
                     asyncio.run(_client_mbps(shards[:1], _blocks(count, size, f"bench-r1-{i}"), replication=1)))
                    for i in range(max(1, args.repeats))]  # interleaved: the machine's noise hits all alike
            (raw_put, raw_get), (aio_put, aio_get), (one_put, one_get) = [
                tuple(statistics.median(run[which][k] for run in runs) for k in (0, 1)) for which in range(3)]
            r2_put, r2_get = asyncio.run(_client_mbps(shards, _blocks(count, size, "bench-r2"), replication=2))
            lookup = asyncio.run(_lookup_latency(shards, blocks, 50 if args.quick else 300))
            model_load = bench_model_load(shards, "tiny" if args.quick else "small", tmp)
    report = {
        "block_bytes": size, "blocks": count, "repeats": len(runs),
        "raw_grpc": {"client_stream_mbps": raw_put, "server_stream_mbps": raw_get},
        "raw_grpc_aio_server": {"client_stream_mbps": aio_put, "server_stream_mbps": aio_get},
        "pool_r1_one_shard": {"put_mbps": one_put, "get_mbps": one_get,
                              "put_vs_raw": one_put / raw_put, "get_vs_raw": one_get / raw_get,
                              "put_vs_raw_aio": one_put / aio_put, "get_vs_raw_aio": one_get / aio_get},
        "pool_r2_three_shards": {"put_mbps": r2_put, "get_mbps": r2_get},
        "lookup": lookup, "model_load": model_load,
    }
    path = write_report(args.out, "kvcache", report)
    _print(report)
    print(f"\nthreads: 1; JSON: {path}")
    return 0


def _print(r: dict) -> None:
    raw, aio = r["raw_grpc"], r["raw_grpc_aio_server"]
    one, r2 = r["pool_r1_one_shard"], r["pool_r2_three_shards"]
    print(f"blocks: {r['blocks']} x {r['block_bytes'] // 1024} KiB; "
          f"throughput: median of {r['repeats']} interleaved runs")
    print(f"{'':<36} {'put MB/s':>9} {'get MB/s':>9}")
    print(f"{'raw gRPC, thread-pool server':<36} {raw['client_stream_mbps']:>9.0f} {raw['server_stream_mbps']:>9.0f}")
    print(f"{'raw gRPC, asyncio server (as shards)':<36} {aio['client_stream_mbps']:>9.0f} {aio['server_stream_mbps']:>9.0f}")
    print(f"{'pool client, 1 shard, R=1':<36} {one['put_mbps']:>9.0f} {one['get_mbps']:>9.0f}"
          f"   ({one['put_vs_raw']:.0%} / {one['get_vs_raw']:.0%} of raw threads, "
          f"{one['put_vs_raw_aio']:.0%} / {one['get_vs_raw_aio']:.0%} of raw asyncio)")
    print(f"{'pool client, 3 shards, R=2':<36} {r2['put_mbps']:>9.0f} {r2['get_mbps']:>9.0f}   (put writes 2 copies)")
    lk = r["lookup"]
    print(f"Lookup of {lk['keys']} prefix keys over 3 shards: p50 {lk['p50_s'] * 1e3:.2f} ms, p99 {lk['p99_s'] * 1e3:.2f} ms")
    ml = r["model_load"]
    print(f"model load ({ml['preset']}, {ml['bytes'] / 1e6:.0f} MB of weights): disk {ml['disk_s']:.2f} s, "
          f"pool {ml['pool_s']:.2f} s, first load publishing to the pool {ml['publish_s']:.2f} s")
