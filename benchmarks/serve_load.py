"""Load benchmark of the service against the raw model, measured in one run.

What it does, in order:

1. Model: publishes a randomly initialised ResNet-18-CBAM (224 px, the default
   architecture) into a temporary model repository, or serves ``--model-dir``/``--model``.
2. Images: pre-encodes a few synthetic JPEGs at the model's resize size, so the service's
   resize is a no-op and the numbers measure serving, not image sizes.
3. Servers: ``python -m app`` on loopback in a subprocess, and ``serve_naive.py`` (plain
   FastAPI, one forward pass per request, no batching) on another port.
4. Rounds (``--rounds``), alternating raw and served runs: raw forward, service with N
   concurrent single-image clients, raw, service with one client sending M-image
   requests, raw, naive baseline with N clients, raw, ... Each served run is compared to
   the raw forward measured just before and just after it. Clients are
   ``serve_client.py``: a light asyncio client in its own process with pre-built requests.
   The raw forward runs in this process, prepared exactly as the service prepares it
   (same threads, channels_last, inference mode, on a worker thread), at the service's
   maximum batch size.
5. Overload: open-loop arrivals at F x the throughput of the N-client runs; counts every
   status, the accepted requests' latency and how fast the 503s come back.
6. SIGTERM to the service; its exit code is reported.

Two ratios are printed. ``ratio``: served images/s over raw images/s (wall clock).
``cpu ratio``: the raw forward's CPU time per image over the server's CPU time per image
(all its threads), i.e. the share of the server's CPU that goes into the forward pass.
On a machine shared with other work the wall-clock numbers swing with the neighbours'
load (and a server with more threads gets a bigger share of a contended CPU); the CPU
ratio does not, but it cannot see idle gaps. Read both, and the per-round ratios.

    python benchmarks/serve_load.py                      # all scenarios, defaults
    python benchmarks/serve_load.py --rounds 1 --duration 10 --scenarios clients multi
"""

from __future__ import annotations

import os

# As ``python -m app`` does, before torch is imported, so that the raw forward measured
# here, the service and the naive baseline (children inherit it) run the same OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

import numpy as np
import torch
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from app.inference import InferenceModel, usable_cores
from wastenet.artifacts import list_versions, load_version, publish_version
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model
from wastenet.schema import Preprocessing

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCENARIOS = ("clients", "multi", "overload", "baseline")


# -- setup ------------------------------------------------------------------------------
def publish_random_model(repo: Path, name: str, input_size: int) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(arch="resnet18", cbam="block")
    evaluation = {
        "split": "none",
        "num_samples": 0,
        "accuracy": 0.0,
        "macro_f1": 0.0,
        "per_class_f1": {c: 0.0 for c in CLASS_NAMES},
    }
    preprocessing = Preprocessing(resize_size=round(input_size * 256 / 224), input_size=input_size)
    ref = publish_version(
        repo,
        name,
        build_model(config),
        config,
        CLASS_NAMES,
        evaluation,
        preprocessing,
        description="randomly initialised, for benchmarks only",
    )
    return ref.path


def make_images(size: int, count: int, out: Path) -> list[Path]:
    """Smooth synthetic photos (gradients, shapes, mild noise) as JPEG, ``size`` square."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        ramp = np.linspace(0, 1, size)
        base = np.stack(
            [np.outer(ramp, np.ones(size)) * rng.uniform(60, 200) for _ in range(3)], axis=-1
        )
        base += rng.normal(0, 6, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, size, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=colour)
        path = out / f"img{i}.jpg"
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- raw model --------------------------------------------------------------------------
class RawModel:
    """The forward pass alone, prepared exactly as the service prepares it."""

    def __init__(self, version_dir: Path, warmup_s: float = 2.0) -> None:
        self.warmup_s = warmup_s
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="raw")
        torch.set_num_threads(usable_cores())
        self.model = InferenceModel(load_version(version_dir), torch.device("cpu"))
        size = self.model.preprocessing.input_size
        self.image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)

    def measure(self, batch_size: int, seconds: float) -> tuple[float, float]:
        """(images per wall second, CPU seconds per image) of the forward pass.

        Runs on a worker thread as in the service: from the main thread the same forward
        pass measured up to 2x more CPU per image here.
        """
        return self._thread.submit(self._measure, batch_size, seconds).result()

    def _measure(self, batch_size: int, seconds: float) -> tuple[float, float]:
        with torch.inference_mode():
            x = self.model.inputs([self.image] * batch_size)
            # Unmeasured warm-up: the first forward passes at a batch size are much slower
            # (oneDNN primitives, and glibc growing its mmap threshold so that activations
            # stop being page-faulted in on every pass).
            start = time.perf_counter()
            while time.perf_counter() - start < self.warmup_s:
                self.model.model(x)
            count, start, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < seconds:
                self.model.model(x)
                count += batch_size
            wall = time.perf_counter() - start
            return count / wall, (time.process_time() - cpu) / count


# -- service ----------------------------------------------------------------------------
def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise RuntimeError("server did not become ready in time")


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("waste_batch_size_sum", "waste_batch_size_count"):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def run_client(port: int, images: list[Path], **options: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "serve_client.py"), "--port", str(port), "--images"]
    cmd += [str(p) for p in images]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    q = np.percentile(np.array(values) * 1000.0, [50, 95, 99])
    return {
        "p50_ms": float(q[0]),
        "p95_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "max_ms": max(values) * 1000.0,
    }


def scenario(
    port: int, pid: int, images: list[Path], metrics: bool = True, **client_options: Any
) -> dict[str, Any]:
    before = scrape(port) if metrics else {}
    cpu_before = process_cpu_s(pid)
    result = run_client(port, images, **client_options)
    cpu = process_cpu_s(pid) - cpu_before
    after = scrape(port) if metrics else {}
    images_served = result["total_ok_requests"] * result["per_request"]
    result["server_cpu_s_per_image"] = cpu / images_served if images_served else None
    batches = after.get("waste_batch_size_count", 0) - before.get("waste_batch_size_count", 0)
    summed = after.get("waste_batch_size_sum", 0) - before.get("waste_batch_size_sum", 0)
    result["mean_batch_size"] = summed / batches if batches else None
    return result


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the rounds of one scenario: mean img/s, per-round and pooled ratios, latencies."""
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for row in rounds:
        for key, value in row["statuses"].items():
            statuses[key] = statuses.get(key, 0) + value
        for key, value in row["errors"].items():
            errors[key] = errors.get(key, 0) + value
    ok = [x for row in rounds for x in row["ok_latencies"]]
    other = [x for row in rounds for x in row["other_latencies"]]
    batch_sizes = [row["mean_batch_size"] for row in rounds if row["mean_batch_size"]]
    result: dict[str, Any] = {
        "images_per_s": statistics.mean(row["images_per_s"] for row in rounds),
        "requests_per_s": statistics.mean(row["requests_per_s"] for row in rounds),
        "statuses": statuses,
        "errors": errors,
        "latency": percentiles(ok),
        "rejected_latency": percentiles(other),
        "mean_batch_size": statistics.mean(batch_sizes) if batch_sizes else None,
        "rounds": [{k: v for k, v in row.items() if not k.endswith("latencies")} for row in rounds],
    }
    cpu = [row["server_cpu_s_per_image"] for row in rounds if row["server_cpu_s_per_image"]]
    result["server_cpu_ms_per_image"] = statistics.mean(cpu) * 1000 if cpu else None
    if all("raw_cpu_s_per_image" in row for row in rounds) and cpu:
        raw_cpu = statistics.mean(row["raw_cpu_s_per_image"] for row in rounds)
        result["raw_cpu_ms_per_image"] = raw_cpu * 1000
        result["cpu_ratio"] = raw_cpu / statistics.mean(cpu)
    if all("raw_images_per_s" in row for row in rounds):
        raw_total = sum(row["raw_images_per_s"] for row in rounds)
        result["raw_images_per_s"] = raw_total / len(rounds)
        result["ratio"] = sum(row["images_per_s"] for row in rounds) / raw_total
        result["round_ratios"] = [row["images_per_s"] / row["raw_images_per_s"] for row in rounds]
    return result


def start_service(repo: Path, name: str, port: int, args: argparse.Namespace) -> Any:
    env = dict(os.environ)
    env.update(
        {
            "WASTE_MODEL_DIR": str(repo),
            "WASTE_DEFAULT_MODEL": name,
            "WASTE_BOOTSTRAP_DEMO": "0",
            "WASTE_DEVICE": args.device,
            "WASTE_PORT": str(port),
            "WASTE_MAX_BATCH_SIZE": str(args.max_batch_size),
            "WASTE_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms),
            "WASTE_MAX_QUEUE_IMAGES": str(args.max_queue_images),
            "WASTE_MAX_FILES_PER_REQUEST": str(min(args.max_queue_images, max(args.multi, 1))),
            "WASTE_REQUEST_TIMEOUT_S": str(args.request_timeout_s),
            "WASTE_ACCESS_LOG": "0",
            "WASTE_LOG_LEVEL": "warning",
        }
    )
    return subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env)


# -- report -----------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    print()
    print(f"machine: {report['machine']}")
    print(f"model: {report['model']}")
    print(f"settings: {report['settings']}")
    raw_info = ", ".join(f"batch {k}: {v:.1f}" for k, v in report["raw_batch_sizes"].items())
    print(f"raw forward images/s at start ({raw_info})")
    header = (
        f"{'scenario':<36}{'img/s':>7}{'raw':>7}{'ratio':>7}{'cpu ms':>7}{'raw ms':>7}"
        f"{'cpu ratio':>10}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'batch':>6}  per-round ratios"
    )
    print(header)
    print("-" * len(header))
    for key, row in report["scenarios"].items():
        lat = row["latency"]
        rounds = ", ".join(f"{r:.3f}" for r in row.get("round_ratios", []))
        print(
            f"{key:<36}{fmt(row['images_per_s']):>7}{fmt(row.get('raw_images_per_s')):>7}"
            f"{fmt(row.get('ratio'), '.3f'):>7}{fmt(row.get('server_cpu_ms_per_image')):>7}"
            f"{fmt(row.get('raw_cpu_ms_per_image')):>7}{fmt(row.get('cpu_ratio'), '.3f'):>10}"
            f"{fmt(lat['p50_ms'], '.0f'):>8}"
            f"{fmt(lat['p95_ms'], '.0f'):>8}{fmt(lat['p99_ms'], '.0f'):>8}"
            f"{fmt(row.get('mean_batch_size'), '.2f'):>6}  [{rounds}] {row['statuses']} "
            f"{row['errors'] or ''}"
        )
    print(
        "img/s, raw: wall-clock images/s; ratio = service / raw, each run against the raw "
        "forward measured just before and after it.\ncpu ms: server CPU time per image (all "
        "threads); raw ms: the forward's CPU time per image; cpu ratio = raw ms / cpu ms, "
        "the share of the CPU the service spends in the forward (insensitive to other load)."
    )
    overload = report.get("overload")
    if overload:
        rej = overload["rejected_latency"]
        print(
            f"overload: offered {overload['offered_requests_per_s']:.1f} req/s "
            f"({report['settings']['overload_factor']:g}x); answered 200: "
            f"{overload['statuses'].get('200', 0)}, 503: {overload['statuses'].get('503', 0)}, "
            f"anything else: {overload['unexpected'] or 'none'}\n"
            f"  accepted p50/p99 {fmt(overload['latency']['p50_ms'], '.0f')}/"
            f"{fmt(overload['latency']['p99_ms'], '.0f')} ms; bound from the queue: "
            f"{fmt(overload['latency_bound_ms'], '.0f')} ms ((queue + 2 batches) / drained "
            f"{overload['images_per_s']:.1f} img/s); request timeout "
            f"{report['settings']['request_timeout_s'] * 1000:.0f} ms; "
            f"503 answered in p50/p99 {fmt(rej['p50_ms'], '.1f')}/{fmt(rej['p99_ms'], '.1f')} ms"
        )
    if report.get("shutdown_exit_code") is not None:
        print(f"service exit code after SIGTERM: {report['shutdown_exit_code']}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, help="existing model repository to serve")
    parser.add_argument("--model", default="waste-resnet18-cbam", help="model name")
    parser.add_argument("--input-size", type=int, default=224, help="for the random model")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--multi", type=int, default=32, help="images per request in 'multi'")
    parser.add_argument("--overload-factor", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--duration", type=float, default=20.0, help="measured s per run")
    parser.add_argument("--warmup", type=float, default=4.0, help="unmeasured s per run")
    parser.add_argument("--raw-seconds", type=float, default=6.0, help="per raw measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument(
        "--max-queue-images",
        type=int,
        default=32,
        help="queue bound; with 2 cores, 32 images are about 2-4 s of work",
    )
    parser.add_argument("--request-timeout-s", type=float, default=30.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model_dir:
            repo = args.model_dir
            version_dir = repo / args.model / str(max(list_versions(repo / args.model)))
        else:
            repo = tmp / "models"
            version_dir = publish_random_model(repo, args.model, args.input_size)
        raw = RawModel(version_dir)
        metadata = raw.model.metadata
        images = make_images(metadata.preprocessing.resize_size, 8, tmp)
        batch = args.max_batch_size
        print("raw forward at batch sizes 1, max, multi ...", flush=True)
        raw_sizes = {
            size: raw.measure(size, args.raw_seconds)[0] for size in sorted({1, batch, args.multi})
        }
        report: dict[str, Any] = {
            "machine": f"{usable_cores()} usable CPU cores, torch {torch.__version__}; shared "
            "with other work, so absolute numbers are noisy",
            "model": f"{metadata.architecture.arch}, cbam={metadata.architecture.cbam}, "
            f"{metadata.preprocessing.input_size} px ({version_dir})",
            "settings": {
                "max_batch_size": batch,
                "max_batch_delay_ms": args.max_batch_delay_ms,
                "max_queue_images": args.max_queue_images,
                "request_timeout_s": args.request_timeout_s,
                "device": args.device,
                "clients": args.clients,
                "multi": args.multi,
                "overload_factor": args.overload_factor,
                "rounds": args.rounds,
                "duration_s": args.duration,
            },
            "raw_batch_sizes": {str(k): v for k, v in raw_sizes.items()},
            "scenarios": {},
        }
        common = {"duration": args.duration, "warmup": args.warmup}
        wanted = set(args.scenarios)
        port, naive_port = free_port(), free_port()
        service = start_service(repo, args.model, port, args)
        naive = None
        if "baseline" in wanted:
            naive = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "serve_naive.py"),
                    "--version-dir",
                    str(version_dir),
                    "--port",
                    str(naive_port),
                ],
                cwd=ROOT,
            )
        runs: dict[str, tuple[int, int, bool, dict[str, Any]]] = {}
        one = f"service, {args.clients} clients x 1 image"
        if wanted & {"clients", "overload"}:
            runs[one] = (port, service.pid, True, {"clients": args.clients})
        if "multi" in wanted:
            runs[f"service, 1 client x {args.multi} images"] = (
                port,
                service.pid,
                True,
                {"clients": 1, "per_request": args.multi},
            )
        if naive is not None:
            runs[f"naive FastAPI, {args.clients} clients x 1 image"] = (
                naive_port,
                naive.pid,
                False,
                {"clients": args.clients},
            )
        results: dict[str, list[dict[str, Any]]] = {key: [] for key in runs}
        try:
            wait_ready(port, service)
            if naive is not None:
                wait_ready(naive_port, naive)
            # raw, run, raw, run, ...: each run's reference is the raw rate around it.
            previous = raw.measure(batch, args.raw_seconds)
            for round_index in range(args.rounds):
                for key, (target, pid, metrics, options) in runs.items():
                    print(f"round {round_index + 1}: {key} ...", flush=True)
                    row = scenario(target, pid, images, metrics=metrics, **options, **common)
                    following = raw.measure(batch, args.raw_seconds)
                    row["raw_images_per_s"] = (previous[0] + following[0]) / 2
                    row["raw_cpu_s_per_image"] = (previous[1] + following[1]) / 2
                    previous = following
                    results[key].append(row)
            for key, rows in results.items():
                report["scenarios"][key] = aggregate(rows)
            if "overload" in wanted:
                rate = report["scenarios"][one]["requests_per_s"] * args.overload_factor
                print(f"overload: open loop at {rate:.1f} req/s ...", flush=True)
                row = aggregate(
                    [scenario(port, service.pid, images, mode="open", rate=rate, **common)]
                )
                row["offered_requests_per_s"] = rate
                # Worst accepted wait: the running batch, the full queue ahead, its own
                # batch, at the rate the service drained images under this overload.
                drained = row["images_per_s"]
                worst_images = args.max_queue_images + 2 * args.max_batch_size
                row["latency_bound_ms"] = worst_images / drained * 1000.0 if drained else None
                row["unexpected"] = {
                    k: v for k, v in row["statuses"].items() if k not in ("200", "503")
                } | row["errors"]
                report["overload"] = row
        finally:
            report["shutdown_exit_code"] = stop(service)
            if naive is not None:
                stop(naive)
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
