"""Overload efficiency: how much of its capacity the service keeps serving at F x its load.

The model is a randomly initialised ResNet-18-CBAM at ``--input-size`` px (64 by default:
a cheap forward pass, so a request's cost is mostly HTTP, multipart and decoding, where a
refusal is most likely to cost as much as a served request). Requests carry one JPEG
pre-encoded at the model's resize size. Two parts (``--parts``):

``cost``: what one answer costs, in CPU time, through the real HTTP stack. The app runs
under uvicorn in this process (so ``time.process_time`` counts every server thread and
nothing of the client, which is ``serve_client.py`` in its own process): CPU per 200
with ``--clients`` closed-loop clients, then CPU per 503 with the version's queue held
full and requests arriving at ``--reject-rate``. A CPU-bound service whose refusal costs
r = CPU per 503 / CPU per 200 keeps (1 - F r) / (1 - r) of its capacity at F x load
("goodput from CPU costs"). CPU time does not depend much on other work sharing the
machine; rates do.

``e2e``: ``python -m app`` in a subprocess. Capacity runs (``--clients`` closed-loop
clients) alternate with ``--rounds`` overload runs (open-loop arrivals at ``--factor`` x
the capacity just measured); each overload run's goodput (200s per second) is compared
with the mean capacity just before and after it. The 503s' latency says whether refusing
stays fast; a thread probes ``/health/live`` every 50 ms meanwhile. SIGTERM at the end.

    python benchmarks/overload.py                       # both parts, about 3 minutes
    python benchmarks/overload.py --parts cost --duration 10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as python -m app does

import argparse
import io
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.backends_raw import publish_random
from benchmarks.serve_load import free_port, run_client
from wastenet.schema import Preprocessing

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "waste-resnet18-cbam"


def publish(repo: Path, input_size: int) -> Preprocessing:
    prep = Preprocessing(resize_size=round(input_size * 256 / 224), input_size=input_size)
    publish_random(repo, MODEL, prep)
    return prep


def jpegs(size: int, count: int, out: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels[: size // 2] //= 2  # some structure, so the images differ in more than noise
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        path = out / f"img{i}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def wait_ready(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise RuntimeError("the service did not become ready in time")


def settings(repo: Path, args: argparse.Namespace) -> dict[str, str]:
    return {
        "WASTE_MODEL_DIR": str(repo),
        "WASTE_DEFAULT_MODEL": MODEL,
        "WASTE_BOOTSTRAP_DEMO": "0",
        "WASTE_DEVICE": "cpu",
        "WASTE_MAX_BATCH_SIZE": str(args.max_batch_size),
        "WASTE_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms),
        "WASTE_MAX_QUEUE_IMAGES": str(args.max_queue_images),
        "WASTE_MAX_FILES_PER_REQUEST": "1",
        "WASTE_ACCESS_LOG": "0",
        "WASTE_LOG_LEVEL": "warning",
    }


def ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.array(values) * 1000.0, q)) if values else None


class LivenessProbe(threading.Thread):
    """GET /health/live every ``interval`` s on a fresh connection; keeps the latencies."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/health/live"
        self.interval = interval
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    response.read()
                self.latencies.append(time.perf_counter() - started)
            except (urllib.error.URLError, OSError):
                self.failures += 1


def start_service(repo: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    env = dict(os.environ) | settings(repo, args) | {"WASTE_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env)


def stop(service: subprocess.Popen[bytes]) -> int:
    service.send_signal(signal.SIGTERM)
    try:
        return service.wait(timeout=60)
    except subprocess.TimeoutExpired:
        service.kill()
        return service.wait()


# -- part 1: CPU per answer, the app in this process ------------------------------------
class InProcess:
    """The app under uvicorn on a thread of this process (uvloop and httptools, as ``python
    -m app``), so that this process's CPU time is the server's."""

    def __init__(self, repo: Path, args: argparse.Namespace) -> None:
        import uvicorn

        from app.main import create_app
        from app.settings import load_settings

        values = {k.removeprefix("WASTE_").lower(): v for k, v in settings(repo, args).items()}
        self.app = create_app(load_settings(**values))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(self.app, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)

    def __enter__(self) -> InProcess:
        self.thread.start()
        deadline = time.monotonic() + 180
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_ready(self.port, None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def hold_queue_full(self) -> None:
        """Hold every free slot of the default version's queue (on the server's loop)."""
        registry = self.app.state.service.lifecycle.require_registry()
        batcher = registry.resolve(MODEL, None)[1].batcher
        held = threading.Event()

        def hold() -> None:
            batcher.reserve(batcher.max_queue - batcher.queue_depth - batcher.reserved)
            held.set()

        batcher._loop.call_soon_threadsafe(hold)
        held.wait(10)

    def answers(self) -> float:
        """Prediction answers so far, any status (the app's own waste_requests_total)."""
        families = self.app.state.service.metrics.registry.collect()
        return sum(
            sample.value
            for family in families
            for sample in family.samples
            if sample.name == "waste_requests_total"
        )

    def loop_cpu_s(self) -> float:
        """CPU seconds of the event-loop thread alone (Linux /proc)."""
        stat = Path(f"/proc/self/task/{self.thread.native_id}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_per_answer(self, images: list[Path], **options: Any) -> dict[str, Any]:
        answered, before, loop_before = self.answers(), time.process_time(), self.loop_cpu_s()
        result = run_client(self.port, images, **options)
        cpu, loop = time.process_time() - before, self.loop_cpu_s() - loop_before
        count = self.answers() - answered
        result["cpu_ms_per_answer"] = cpu / count * 1000
        result["loop_cpu_ms_per_answer"] = loop / count * 1000
        return result


def cost_part(repo: Path, images: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    common = {"duration": args.duration, "warmup": args.warmup}
    with InProcess(repo, args) as server:
        print(f"cost: CPU per 200, {args.clients} closed-loop clients ...", flush=True)
        served = server.cpu_per_answer(images, clients=args.clients, **common)
        server.hold_queue_full()
        print(f"cost: CPU per 503, {args.reject_rate:g} req/s at a full queue ...", flush=True)
        refused = server.cpu_per_answer(
            images, mode="open", rate=args.reject_rate, max_connections=2048, **common
        )
    f = args.factor
    print(
        f"\nanswers: {served['statuses']} at {served['requests_per_s']:.1f} req/s, then "
        f"{refused['statuses']} (503 p50/p99 {ms(refused['other_latencies'], 50) or 0:.1f}/"
        f"{ms(refused['other_latencies'], 99) or 0:.1f} ms)"
    )
    ratios = {}
    for key, what in (("cpu", "all threads"), ("loop_cpu", "event-loop thread")):
        per_ok = served[f"{key}_ms_per_answer"]
        per_no = refused[f"{key}_ms_per_answer"]
        ratio = ratios[key] = per_no / per_ok
        print(
            f"CPU ms per 200 / per 503, {what}: {per_ok:.3f} / {per_no:.3f} (r = {ratio:.3f}); "
            f"goodput from CPU costs at {f:g}x load {max(0.0, (1 - f * ratio) / (1 - ratio)):.0%}"
        )
    return {"served": served, "refused": refused, "ratios": ratios}


# -- part 2: end to end, python -m app in a subprocess ----------------------------------
def batch_totals(port: int) -> tuple[float, float]:
    """(images, batches) run so far, from the service's waste_batch_size histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"waste_batch_size_sum": 0.0, "waste_batch_size_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["waste_batch_size_sum"], totals["waste_batch_size_count"]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(port: int, pid: int, images: list[Path], **options: Any) -> dict[str, Any]:
    """One client run, with the service's CPU time and mean batch size meanwhile."""
    images_before, batches_before = batch_totals(port)
    cpu_before = process_cpu_s(pid)
    result = run_client(port, images, **options)
    result["server_cpu_s"] = process_cpu_s(pid) - cpu_before
    result["warmup_s"] = options["warmup"]
    images_after, batches_after = batch_totals(port)
    batches = batches_after - batches_before
    result["mean_batch"] = (images_after - images_before) / batches if batches else None
    return result


def e2e_part(repo: Path, images: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Capacity, overload, capacity, overload, ..., capacity: each overload run is compared
    with the mean of the capacity runs just before and after it (the machine drifts)."""
    common = {"duration": args.duration, "warmup": args.warmup}
    port = free_port()
    service = start_service(repo, port, args)
    rounds: list[dict[str, Any]] = []
    try:
        wait_ready(port, service)
        print("e2e: capacity ...", flush=True)
        before = measured(port, service.pid, images, clients=args.clients, **common)
        for index in range(args.rounds):
            rate = before["requests_per_s"] * args.factor
            print(f"e2e round {index + 1}: {rate:.1f} req/s offered, then capacity ...", flush=True)
            probe = LivenessProbe(port)
            probe.start()
            overload = measured(
                port, service.pid, images, mode="open", rate=rate, max_connections=2048, **common
            )
            probe.stop.set()
            probe.join()
            after = measured(port, service.pid, images, clients=args.clients, **common)
            rounds.append(e2e_report(before, overload, after, probe.latencies))
            before = after
    finally:
        code = stop(service)
    for key, what in (("goodput_ratio", "goodput / capacity"), ("cpu_efficiency", "per CPU")):
        values = [r[key] for r in rounds]
        listed = ", ".join(f"{v:.0%}" for v in values)
        print(f"{what} per round: {listed} (median {statistics.median(values):.0%})")
    print(f"service exit code after SIGTERM: {code}")
    return rounds


def e2e_report(
    before: dict[str, Any], overload: dict[str, Any], after: dict[str, Any], live: list[float]
) -> dict[str, Any]:
    capacity = (before["requests_per_s"] + after["requests_per_s"]) / 2
    good = overload["requests_per_s"] / capacity
    # 200s per CPU-second of the service, overload over capacity: the same efficiency,
    # whatever share of a shared machine the service got in each run.
    per_cpu = [r["total_ok_requests"] / r["server_cpu_s"] for r in (before, overload, after)]
    efficiency = per_cpu[1] / ((per_cpu[0] + per_cpu[2]) / 2)
    rejected, ok = overload["other_latencies"], overload["ok_latencies"]
    print(
        f"  capacity {before['requests_per_s']:.1f} / {after['requests_per_s']:.1f} req/s "
        f"around it (batch {before['mean_batch']:.2f}); goodput {overload['requests_per_s']:.1f}"
        f" req/s = {good:.0%} (batch {overload['mean_batch']:.2f}); {overload['statuses']} "
        f"{overload['errors'] or ''}\n"
        f"  200 p50/p99 {ms(ok, 50) or 0:.0f}/{ms(ok, 99) or 0:.0f} ms; 503 p50/p99/max "
        f"{ms(rejected, 50) or 0:.1f}/{ms(rejected, 99) or 0:.1f}/{ms(rejected, 100) or 0:.1f}"
        f" ms; /health/live p50/p99/max {ms(live, 50) or 0:.1f}/{ms(live, 99) or 0:.1f}/"
        f"{ms(live, 100) or 0:.1f} ms\n"
        f"  200s per service CPU-second: {per_cpu[1]:.1f} under overload, {per_cpu[0]:.1f} / "
        f"{per_cpu[2]:.1f} at capacity: {efficiency:.0%}",
        flush=True,
    )
    overload["liveness_latencies"] = live
    return {
        "capacity": capacity,
        "overload": overload,
        "goodput_ratio": good,
        "cpu_efficiency": efficiency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--parts", nargs="+", choices=["cost", "e2e"], default=["cost", "e2e"])
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--factor", type=float, default=4.0, help="offered load / capacity")
    parser.add_argument("--reject-rate", type=float, default=600.0, help="cost part, req/s")
    parser.add_argument("--rounds", type=int, default=3, help="e2e overload runs")
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured s per phase")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-queue-images", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp_name:
        tmp = Path(tmp_name)
        prep = publish(tmp / "models", args.input_size)
        images = jpegs(prep.resize_size, 8, tmp)
        if "e2e" in args.parts:  # first: the in-process part leaves torch threads behind
            results["e2e"] = e2e_part(tmp / "models", images, args)
        if "cost" in args.parts:
            results["cost"] = cost_part(tmp / "models", images, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
