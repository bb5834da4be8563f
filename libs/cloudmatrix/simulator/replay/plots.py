"""A replay's plots: TTFT and TPOT CDFs, and the instances' utilisation and the decode KV
occupancy over simulated time."""
from __future__ import annotations

from cloudmatrix.simulator.replay.engine import Replay
from cloudmatrix.simulator.replay.report import tpot_s

WINDOW_S = 10.0  # utilisation is averaged over windows of this many simulated seconds


def utilisation(intervals: list[tuple[float, float]], instances: int, end: float) -> list[float]:
    """Busy share of each window, over ``instances`` instances."""
    windows = [0.0] * (int(end // WINDOW_S) + 1)
    for start, stop in intervals:
        t = start
        while t < stop:
            w = int(t // WINDOW_S)
            edge = min(stop, (w + 1) * WINDOW_S)
            windows[w] += edge - t
            t = edge
    return [b / (WINDOW_S * instances) for b in windows]


def plot_replay(replay: Replay, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in replay.tracks.values() if t.done is not None]
    fig, (cdf, over) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, values in (("TTFT", [t.first_token - t.arrival for t in done]),
                          ("TPOT", [v for v in map(tpot_s, done) if v is not None])):
        ordered = sorted(values)
        cdf.plot([v * 1e3 for v in ordered], [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    cdf.set(xscale="log", xlabel="ms (simulated)", ylabel="share of requests", title="latency CDFs")
    cdf.grid(alpha=0.3)
    cdf.legend()
    end = replay.now
    for label, instances in (("prefill", replay.prefills), ("decode", replay.decodes)):
        series = utilisation([iv for i in instances for iv in i.intervals], len(instances), end)
        over.plot([w * WINDOW_S for w in range(len(series))], series, label=f"{label} busy")
    over.plot([t for t, _ in replay.kv_usage], [u for _, u in replay.kv_usage], label="decode KV occupancy", alpha=0.6)
    over.set(xlabel="simulated s", ylabel="share", title=f"utilisation ({WINDOW_S:g} s windows)")
    over.grid(alpha=0.3)
    over.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
