"""How much explanations slow predictions down: predict throughput with and without them.

It publishes a randomly initialised ResNet-18-CBAM (224 px) into a temporary repository,
starts ``python -m app`` on loopback, and drives it with ``serve_client.py`` (its own
process): N closed-loop clients sending one JPEG per predict request, alone and then
with E more clients sending explain requests back to back (the explain bound is the
default 1 running + 4 waiting, so they keep it busy all the time: the worst case). Each
placement restarts the service:

- ``own``: the shipped defaults: its own executor, 1 torch thread, busy at most half the
  time (WASTE_EXPLAIN_THREADS=1, WASTE_EXPLAIN_MAX_BUSY=0.5);
- ``own-busy``: the same thread never resting (WASTE_EXPLAIN_MAX_BUSY=1);
- ``own-all``: never resting, with as many torch threads as the forward pass
  (WASTE_EXPLAIN_THREADS=0);
- ``inference``: explanations run on the batcher's single inference thread between batches
  (not a setting: the launcher patches ``Explainer._executor``), the other design asked about.

Rounds alternate "predict alone" and "predict + explain" on the same running service, so
each slowdown is measured against the baseline taken just before it.

    python benchmarks/explain_load.py                      # about 7 minutes on 2 cores
    python benchmarks/explain_load.py --rounds 1 --duration 10 --placements own
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as python -m app does

import argparse
import statistics
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

from benchmarks.backends_raw import MODEL as NAME
from benchmarks.backends_raw import publish
from benchmarks.photos import write_photos
from benchmarks.serve_load import Server, free_port, percentiles, run_client

PLACEMENTS = ("own", "own-busy", "own-all", "inference")
LAUNCHER = textwrap.dedent(
    """
    import runpy, sys
    if sys.argv[1] == "inference":
        from app.explain import Explainer
        Explainer._executor = lambda self: self._lifecycle.inference_pool
    sys.argv = sys.argv[:1]
    runpy.run_module("app", run_name="__main__", alter_sys=True)
    """
)


def start(repo: Path, port: int, placement: str, args: argparse.Namespace) -> Server:
    env = {
        "WASTE_MODEL_DIR": str(repo),
        "WASTE_DEFAULT_MODEL": NAME,
        "WASTE_BOOTSTRAP_DEMO": "0",
        "WASTE_DEVICE": args.device,
        "WASTE_PORT": str(port),
        "WASTE_ACCESS_LOG": "0",
        "WASTE_LOG_LEVEL": "warning",
        "WASTE_EXPLAIN_THREADS": "0" if placement == "own-all" else "1",
        "WASTE_EXPLAIN_MAX_BUSY": "0.5" if placement == "own" else "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    cmd = [sys.executable, "-c", LAUNCHER, placement]
    server = Server(key=f"explain-{placement}", cmd=cmd, port=port, health="/health/ready", env=env)
    server.start()
    server.wait_ready()
    return server


def measure(port: int, images: list[Path], args: argparse.Namespace, explain: bool) -> Any:
    common = {"duration": args.duration, "warmup": args.warmup}
    with ThreadPoolExecutor(2) as pool:
        predict = pool.submit(run_client, port, images, clients=args.clients, **common)
        explained = (
            pool.submit(
                run_client, port, images, clients=args.explain_clients, path="/v1/explain", **common
            )
            if explain
            else None
        )
        return predict.result(), explained.result() if explained else None


def run_placement(
    repo: Path, images: list[Path], placement: str, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    server = start(repo, port, placement, args)
    alone: list[float] = []
    loaded: list[float] = []
    p99_alone: list[float] = []
    p99_loaded: list[float] = []
    explains: list[float] = []
    explain_p50: list[float] = []
    statuses: dict[str, int] = {}
    try:
        run_client(port, images, clients=2, duration=2, warmup=1, path="/v1/explain")
        for _ in range(args.rounds):
            base, _ = measure(port, images, args, explain=False)
            both, explained = measure(port, images, args, explain=True)
            alone.append(base["images_per_s"])
            loaded.append(both["images_per_s"])
            p99_alone.append(percentiles(base["ok_latencies"])["p99_ms"] or 0.0)
            p99_loaded.append(percentiles(both["ok_latencies"])["p99_ms"] or 0.0)
            explains.append(explained["requests_per_s"])
            explain_p50.append(percentiles(explained["ok_latencies"])["p50_ms"] or 0.0)
            for key, value in explained["statuses"].items():
                statuses[key] = statuses.get(key, 0) + value
    finally:
        code = server.stop()
    ratios = [b / a for a, b in zip(alone, loaded, strict=True)]
    return {
        "placement": placement,
        "alone": statistics.mean(alone),
        "with_explain": statistics.mean(loaded),
        "ratios": ratios,
        "p99_alone": statistics.mean(p99_alone),
        "p99_loaded": statistics.mean(p99_loaded),
        "explains_per_s": statistics.mean(explains),
        "explain_p50_ms": statistics.mean(explain_p50),
        "explain_statuses": statuses,
        "exit_code": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=16, help="predict clients, 1 image each")
    parser.add_argument("--explain-clients", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="explain-bench-") as tmp:
        repo = Path(tmp) / "models"
        publish(repo, args.input_size)
        images = write_photos((480, 360), 8, Path(tmp), "photo")
        rows = [run_placement(repo, images, p, args) for p in args.placements]
    print(
        f"\npredict: {args.clients} clients x 1 image; explain: {args.explain_clients} clients "
        f"back to back; {args.rounds} rounds of {args.duration:g} s; {os.cpu_count()} CPUs"
    )
    print(
        "| placement | predict img/s alone | with explain | ratio (per round) | "
        "predict p99 ms alone / with | explains/s | explain p50 ms | explain statuses |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        per_round = ", ".join(f"{x:.3f}" for x in r["ratios"])
        print(
            f"| {r['placement']} | {r['alone']:.1f} | {r['with_explain']:.1f} | "
            f"**{statistics.mean(r['ratios']):.3f}** ({per_round}) | "
            f"{r['p99_alone']:.0f} / {r['p99_loaded']:.0f} | {r['explains_per_s']:.2f} | "
            f"{r['explain_p50_ms']:.0f} | {r['explain_statuses']} |"
        )


if __name__ == "__main__":
    main()
