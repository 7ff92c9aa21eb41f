"""Serving benchmark: every backend and precision, raw and served, and LitServe as a peer.

What it does, in order:

1. Model: a ResNet-18-CBAM trained at 224 px on the synthetic set and published with
   ``model.onnx`` and ``model.int8.onnx`` (``bench_model.py``: trained once, then reused from
   ``--work``; about 10-15 min on 2 CPU cores), so that the int8 agreement printed is a
   trained model's. ``--version-dir`` serves an existing version instead; ``--untrained``
   publishes random weights with exports calibrated on noise (speed only, no agreement).
2. Images: photo-like JPEGs (``photos.py``) of 480x360 and of 2 megapixels (1632x1224).
3. Servers, all started at once: one ``python -m app`` per backend and precision
   (``WASTE_BACKEND``/``WASTE_PRECISION``), a LitServe server (``litserve_peer.py``: LitServe's
   batching, the same backend code and decoding) per ``--litserve`` backend, and with
   ``--naive`` the plain FastAPI endpoint (``serve_naive.py``). Every server is paused
   (SIGSTOP to its process group) except while it is measured: an idle LitServe worker
   polls its queue every millisecond, about a tenth of a core that the others would lose.
4. Rounds (``--rounds``). Per backend: its raw forward, then each served run followed by
   another raw forward, so that every served figure is compared with its own backend's raw
   rate measured just before and after it. The raw forward runs here through the service's
   code (``app.backends``: normalisation, network, logits copy) on a worker thread, at the
   service's maximum batch size (8) with one intra-op thread per core. Clients
   (``serve_client.py``, its own process, pre-built requests on keep-alive connections):
   ``--clients`` (16) concurrent single-image clients with each image size, and one client
   sending requests of ``--multi`` (32) 480x360 images.
5. One table: img/s; ratio to raw eager fp32 (torch fp32, the same round's raw runs) and to
   the backend's own raw rate; server CPU per image against the raw forward's (cpu ratio:
   the share of the server's CPU spent in the forward pass, which other load on the
   machine hardly moves); latency percentiles; mean batch size. Then the targets.

    python benchmarks/serve_load.py                              # everything, ~25 min + training
    python benchmarks/serve_load.py --rounds 1 --duration 5      # a quick look
    python benchmarks/serve_load.py --dry-run                    # the plan and its duration
    python benchmarks/serve_load.py --device cuda                # the same on a GPU

Needs the ``train`` extra (the model's export) and the ``bench`` extra (litserve).
"""

from __future__ import annotations

import os

# As ``python -m app`` does, before torch is imported, so that the raw forward measured
# here and every server (children inherit it) run the same OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.backends import Backend, open_backend
from app.inference import usable_cores
from app.selection import (
    ORT_CUDA,
    ORT_TENSORRT,
    Capabilities,
    Choice,
    probe_capabilities,
    resolve_device,
)
from benchmarks import bench_model
from benchmarks.photos import PHONE_2MP, WEB, write_photos
from benchmarks.serve_client import build_request
from wastenet.artifacts import load_version, read_metadata

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EAGER = "torch-fp32"
IMAGE_SETS = {"480": WEB, "2mp": PHONE_2MP}
IMAGE_TEXT = {"480": "480x360", "2mp": "2 MP"}


# -- what is measured -------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """A backend at a precision: how the service is told, and how the raw forward opens it."""

    key: str
    choice: Choice

    @property
    def env(self) -> dict[str, str]:
        return {"WASTE_BACKEND": self.choice.backend, "WASTE_PRECISION": self.choice.precision}

    def __str__(self) -> str:
        return str(self.choice)


SPECS = {
    s.key: s
    for s in (
        Spec("torch-fp32", Choice("torch", "fp32")),
        Spec("torch-bf16", Choice("torch", "bf16")),
        Spec("torch-fp16", Choice("torch", "fp16")),
        Spec("ort-fp32", Choice("onnxruntime", "fp32")),
        Spec("ort-int8", Choice("onnxruntime", "int8")),
    )
}


def supported_specs(caps: Capabilities) -> list[str]:
    """Every backend and precision this device can run (the version must ship the files)."""
    if not caps.cuda:
        return ["torch-fp32", *(["torch-bf16"] if caps.cpu_bf16 else []), "ort-fp32", "ort-int8"]
    specs = ["torch-fp32", "torch-bf16" if caps.cuda_bf16 else "torch-fp16"]
    if {ORT_CUDA, ORT_TENSORRT} & set(caps.ort_providers):
        specs.append("ort-fp32")
    if ORT_TENSORRT in caps.ort_providers:
        specs.append("ort-int8")
    return specs


@dataclass(frozen=True)
class Run:
    """One served measurement: a server kind serving one spec, under one load."""

    server: str  # "service", "litserve" or "naive"
    spec: str
    images: str  # a key of IMAGE_SETS
    clients: int
    per_request: int

    @property
    def server_key(self) -> str:
        return f"{self.server}:{self.spec}"

    @property
    def label(self) -> str:
        load = (
            f"{self.clients} x 1 {IMAGE_TEXT[self.images]}"
            if self.per_request == 1
            else f"1 x {self.per_request} {IMAGE_TEXT[self.images]}"
        )
        return f"{self.server} {SPECS[self.spec]}, {load}"


def plan_runs(specs: list[str], litserve: list[str], naive: bool, args: Any) -> list[Run]:
    runs = []
    for spec in specs:
        runs += [Run("service", spec, images, args.clients, 1) for images in IMAGE_SETS]
        if args.multi:
            runs.append(Run("service", spec, "480", 1, args.multi))
        if spec in litserve:
            runs += [Run("litserve", spec, images, args.clients, 1) for images in IMAGE_SETS]
        if naive and spec == EAGER:
            runs.append(Run("naive", spec, "480", args.clients, 1))
    return runs


def estimated_seconds(runs: list[Run], specs: list[str], args: Any) -> float:
    served = len(runs) * (args.duration + args.warmup + 2.0)  # + client start-up
    raw = (len(runs) + len(specs)) * (args.raw_seconds + args.raw_warmup)
    return args.rounds * (served + raw) + 60.0  # + server start-up


# -- raw forward ------------------------------------------------------------------------
class Raw:
    """Each spec's backend opened in this process, timed on one fixed uint8 batch."""

    def __init__(
        self, version_dir: Path, specs: list[str], caps: Capabilities, threads: int, batch: int
    ) -> None:
        torch.set_num_threads(threads)
        self.warmup_s = 0.0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="raw")  # as the service's
        self.backends: dict[str, Backend] = {}
        self.batches: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(0)
        for key in specs:
            loaded = load_version(version_dir)
            backend, _ = open_backend(
                [SPECS[key].choice], loaded, caps, threads=threads, max_batch_size=batch
            )
            self.backends[key] = backend
            pixels = self.batches[key] = backend.host_buffer(batch)  # pinned on CUDA
            pixels[:] = rng.integers(0, 256, pixels.shape, dtype=np.uint8)

    def measure(self, key: str, seconds: float) -> tuple[float, float]:
        """(images per wall second, CPU seconds per image) of one backend's forward."""
        return self._thread.submit(self._measure, key, seconds).result()

    def _measure(self, key: str, seconds: float) -> tuple[float, float]:
        backend, batch = self.backends[key], self.batches[key]
        start = time.perf_counter()
        # Unmeasured first: the previous backend's data left the caches, and the first
        # passes at a batch size set up kernels.
        while time.perf_counter() - start < self.warmup_s:
            backend.forward(batch)
        count, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            backend.forward(batch)
            count += len(batch)
        wall = time.perf_counter() - start
        return count / wall, (time.process_time() - cpu) / count


# -- servers ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (Linux /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A server in its own process group (so that pausing and CPU time cover its children)."""

    key: str
    cmd: list[str]
    port: int
    health: str
    env: dict[str, str] = field(default_factory=dict)
    metrics: bool = False  # the service's Prometheus batch histogram
    stats: Path | None = None  # litserve_peer.py's batch counters
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 600.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.key} exited with {self.proc.returncode} before ready")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}{self.health}", timeout=2
                ):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"{self.key} did not become ready in {timeout:.0f} s")

    def pause(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def cpu_s(self) -> float:
        return group_cpu_s(self.pid)

    def batch_counters(self) -> tuple[float, float] | None:
        """(batches, images) so far, where the server counts them."""
        if self.metrics:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            values = {"waste_batch_size_count": 0.0, "waste_batch_size_sum": 0.0}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in values:
                        values[sample.name] += sample.value
            return values["waste_batch_size_count"], values["waste_batch_size_sum"]
        counts = self.stats.read_text().split() if self.stats and self.stats.exists() else []
        return (float(counts[0]), float(counts[1])) if len(counts) == 2 else None

    def stop(self) -> int | None:
        """SIGTERM (after SIGCONT); the exit code, or None when it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        # Whatever the main process left behind (LitServe's worker processes).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if code is None:
            self.proc.wait()
        return code


def make_servers(
    runs: list[Run], version_dir: Path, tmp: Path, args: argparse.Namespace
) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    repo = single_version_repo(version_dir, tmp)
    for run in runs:
        if run.server_key in servers:
            continue
        spec, port = SPECS[run.spec], free_port()
        if run.server == "service":
            server = Server(
                run.server_key,
                [sys.executable, "-m", "app"],
                port,
                "/health/ready",
                env=service_env(repo, version_dir.parent.name, spec, port, args),
                metrics=True,
            )
        elif run.server == "litserve":
            stats = tmp / f"litserve-{run.spec}.stats"
            cmd = [
                sys.executable,
                str(HERE / "litserve_peer.py"),
                "--version-dir",
                str(version_dir),
            ]
            cmd += ["--backend", spec.choice.backend, "--precision", spec.choice.precision]
            cmd += ["--port", str(port), "--device", args.device, "--stats", str(stats)]
            cmd += ["--max-batch-size", str(args.max_batch_size)]
            cmd += ["--batch-timeout-ms", str(args.max_batch_delay_ms)]
            server = Server(run.server_key, cmd, port, "/health", stats=stats)
        else:
            cmd = [sys.executable, str(HERE / "serve_naive.py"), "--version-dir", str(version_dir)]
            server = Server(run.server_key, [*cmd, "--port", str(port)], port, "/health/ready")
        servers[run.server_key] = server
    return servers


def single_version_repo(version_dir: Path, tmp: Path) -> Path:
    """A model repository holding only ``version_dir`` (a link), so that the service answers
    with the version that the raw forward and LitServe use; the benchmark's own repository
    also holds versions derived with other int8 recipes, and the service would serve the
    newest of them."""
    repo = tmp / "repo"
    link = repo / version_dir.parent.name / version_dir.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(version_dir.resolve(), target_is_directory=True)
    return repo


def service_env(
    repo: Path, model: str, spec: Spec, port: int, args: argparse.Namespace
) -> dict[str, str]:
    return {
        "WASTE_MODEL_DIR": str(repo),
        "WASTE_DEFAULT_MODEL": model,
        "WASTE_BOOTSTRAP_DEMO": "0",
        "WASTE_DEVICE": args.device,
        "WASTE_PORT": str(port),
        "WASTE_MAX_BATCH_SIZE": str(args.max_batch_size),
        "WASTE_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms),
        "WASTE_MAX_QUEUE_IMAGES": str(max(64, args.multi)),
        "WASTE_MAX_FILES_PER_REQUEST": str(max(1, args.multi)),
        "WASTE_ACCESS_LOG": "0",
        "WASTE_LOG_LEVEL": "warning",
        **spec.env,
    }


def check_answer(server: Server, version_dir: Path, image: Path) -> None:
    """One prediction: the server must answer with the measured backend and precision (and
    the service with the measured version), or every figure of it would be another's."""
    spec = SPECS[server.key.split(":")[1]].choice
    expected: dict[str, object] = {"backend": spec.backend, "precision": spec.precision}
    if server.key.startswith("service:"):
        expected["version"] = int(version_dir.name)
    request = build_request("127.0.0.1", server.port, "/v1/predict", [image.read_bytes()])
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as conn:
        conn.sendall(request.replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        answer = b"".join(iter(lambda: conn.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    got = json.loads(body) if head.split()[1] == b"200" else {}
    if {k: got.get(k) for k in expected} != expected:
        raise RuntimeError(
            f"{server.key} answered {head[:12]!r} {body[:300]!r}; expected {expected}"
        )


# -- one served run ---------------------------------------------------------------------
def run_client(port: int, images: list[Path], **options: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "serve_client.py"), "--port", str(port), "--images"]
    cmd += [str(p) for p in images]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def served(
    server: Server, run: Run, images: list[Path], args: argparse.Namespace
) -> dict[str, Any]:
    """One client run against a resumed server; its CPU per image and mean batch size."""
    server.resume()
    try:
        before, cpu_before = server.batch_counters(), server.cpu_s()
        result = run_client(
            server.port,
            images,
            clients=run.clients,
            per_request=run.per_request,
            duration=args.duration,
            warmup=args.warmup,
        )
        cpu, after = server.cpu_s() - cpu_before, server.batch_counters()
    finally:
        server.pause()
    images_served = result["total_ok_requests"] * run.per_request
    result["server_cpu_s_per_image"] = cpu / images_served if images_served else None
    result["mean_batch_size"] = None
    if before is not None and after is not None and after[0] > before[0]:
        result["mean_batch_size"] = (after[1] - before[1]) / (after[0] - before[0])
    return result


# -- rounds -----------------------------------------------------------------------------
def one_round(
    round_index: int,
    specs: list[str],
    runs: list[Run],
    raw: Raw,
    servers: dict[str, Server],
    images: dict[str, list[Path]],
    args: argparse.Namespace,
) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[Run, dict[str, Any]]]]:
    """Per spec: raw, then (served run, raw) pairs. Returns the raw figures and the rows."""
    raw_figures: dict[str, list[tuple[float, float]]] = {}
    rows = []
    for spec in specs:
        previous = raw.measure(spec, args.raw_seconds)
        raw_figures[spec] = [previous]
        for run in (r for r in runs if r.spec == spec):
            print(f"round {round_index + 1}: {run.label} ...", file=sys.stderr, flush=True)
            row = served(servers[run.server_key], run, images[run.images], args)
            following = raw.measure(spec, args.raw_seconds)
            raw_figures[spec].append(following)
            row["raw_images_per_s"] = (previous[0] + following[0]) / 2
            row["raw_cpu_s_per_image"] = (previous[1] + following[1]) / 2
            row["round"] = round_index
            previous = following
            rows.append((run, row))
    return raw_figures, rows


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    q = np.percentile(np.array(values) * 1000.0, [50, 95, 99])
    return {"p50_ms": float(q[0]), "p95_ms": float(q[1]), "p99_ms": float(q[2])}


def aggregate(rows: list[dict[str, Any]], eager_by_round: dict[int, float]) -> dict[str, Any]:
    """Pool one run's rounds: mean img/s, pooled ratios, per-round ratios, latencies."""
    statuses: dict[str, int] = {}
    for row in rows:
        for key, value in {**row["statuses"], **row["errors"]}.items():
            statuses[key] = statuses.get(key, 0) + value
    served_total = sum(row["images_per_s"] for row in rows)
    raw_total = sum(row["raw_images_per_s"] for row in rows)
    batch = [row["mean_batch_size"] for row in rows if row["mean_batch_size"]]
    cpu = [row["server_cpu_s_per_image"] for row in rows if row["server_cpu_s_per_image"]]
    raw_cpu = statistics.mean(row["raw_cpu_s_per_image"] for row in rows)
    result: dict[str, Any] = {
        "images_per_s": served_total / len(rows),
        "raw_images_per_s": raw_total / len(rows),
        "ratio": served_total / raw_total,
        "round_ratios": [row["images_per_s"] / row["raw_images_per_s"] for row in rows],
        "statuses": statuses,
        "latency": percentiles([x for row in rows for x in row["ok_latencies"]]),
        "mean_batch_size": statistics.mean(batch) if batch else None,
        "server_cpu_ms_per_image": statistics.mean(cpu) * 1000 if cpu else None,
        "raw_cpu_ms_per_image": raw_cpu * 1000,
        "cpu_ratio": raw_cpu / statistics.mean(cpu) if cpu else None,
    }
    if eager_by_round:
        eager_total = sum(eager_by_round[row["round"]] for row in rows)
        result["vs_eager"] = served_total / eager_total
    return result


# -- report -----------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_raw_table(report: dict[str, Any]) -> None:
    raw = report["raw"]
    eager = raw.get(EAGER, {}).get("images_per_s")
    print(
        f"\nraw forward: batch {report['settings']['max_batch_size']}, "
        f"{report['model']['input_size']} px, {report['threads']} threads; mean of every raw "
        "measurement of the run"
    )
    print(f"{'backend':<20}{'img/s':>8}{'vs eager':>10}{'CPU ms/img':>12}  per round (img/s)")
    for key, row in raw.items():
        ratio = row["images_per_s"] / eager if eager else None
        rounds = ", ".join(f"{v:.1f}" for v in row["round_means"])
        print(
            f"{SPECS[key]!s:<20}{row['images_per_s']:8.1f}{fmt(ratio, '.2f'):>10}"
            f"{row['cpu_ms_per_image']:12.2f}  [{rounds}]"
        )


def print_served_table(report: dict[str, Any]) -> None:
    header = (
        f"{'served':<44}{'img/s':>7}{'vs eager':>9}{'raw':>7}{'vs raw':>7}{'cpu ms':>7}"
        f"{'raw ms':>7}{'cpu ratio':>10}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'batch':>6}"
        "  vs raw per round"
    )
    print()
    print(header)
    print("-" * len(header))
    for label, row in report["served"].items():
        lat = row["latency"]
        rounds = ", ".join(f"{r:.2f}" for r in row["round_ratios"])
        bad = {k: v for k, v in row["statuses"].items() if k != "200"}
        print(
            f"{label:<44}{row['images_per_s']:7.1f}{fmt(row.get('vs_eager'), '.2f'):>9}"
            f"{row['raw_images_per_s']:7.1f}{row['ratio']:7.2f}"
            f"{fmt(row['server_cpu_ms_per_image'], '.2f'):>7}{row['raw_cpu_ms_per_image']:7.2f}"
            f"{fmt(row['cpu_ratio'], '.2f'):>10}{fmt(lat['p50_ms'], '.0f'):>8}"
            f"{fmt(lat['p95_ms'], '.0f'):>8}{fmt(lat['p99_ms'], '.0f'):>8}"
            f"{fmt(row['mean_batch_size'], '.2f'):>6}  [{rounds}]" + (f" {bad}" if bad else "")
        )
    print(
        "img/s: wall-clock images/s served; vs eager: / raw torch fp32 of the same rounds; "
        "raw, vs raw: the backend's own raw rate\njust before and after each run, and the "
        "ratio to it; cpu ms: server CPU per image (every thread and process); raw ms: the "
        "forward's\nCPU per image; cpu ratio = raw ms / cpu ms; batch: mean images per "
        "forward pass."
    )


def find_row(report: dict[str, Any], run: Run) -> dict[str, Any] | None:
    row: dict[str, Any] | None = report["served"].get(run.label)
    return row


def target_lines(report: dict[str, Any], runs: list[Run], args: argparse.Namespace) -> list[str]:
    """Each target of the serving work, with the measured figure and met / MISSED."""
    lines: list[str] = []

    def check(text: str, value: float | None, goal: float, digits: int = 2) -> None:
        if value is None:
            return
        verdict = "met" if value >= goal else "MISSED"
        lines.append(f"  {text}: {value:.{digits}f} (target >= {goal:g}: {verdict})")

    for images in IMAGE_SETS:
        int8 = find_row(report, Run("service", "ort-int8", images, args.clients, 1))
        eager = find_row(report, Run("service", EAGER, images, args.clients, 1))
        if int8 and eager:
            ratio = int8["images_per_s"] / eager["images_per_s"]
            check(f"served int8 / served eager fp32, {IMAGE_TEXT[images]}", ratio, 2.5)
    for run in runs:
        row = find_row(report, run)
        if row and run.server == "service" and run.per_request == 1:
            goal = 0.8 if run.images == "480" else 0.7
            check(f"{run.label}: served / own raw", row["ratio"], goal)
    for run in runs:
        if run.server != "litserve":
            continue
        ours = find_row(report, Run("service", run.spec, run.images, run.clients, 1))
        theirs = find_row(report, run)
        if ours and theirs:
            text = f"service / LitServe, {SPECS[run.spec]}, {IMAGE_TEXT[run.images]}"
            check(text, ours["images_per_s"] / theirs["images_per_s"], 1.0)
            if ours["server_cpu_ms_per_image"] and theirs["server_cpu_ms_per_image"]:
                lines[-1] += (
                    f"; CPU per image {ours['server_cpu_ms_per_image']:.1f} ms vs "
                    f"{theirs['server_cpu_ms_per_image']:.1f} ms"
                )
    agreement = report["model"].get("int8_agreement")
    if agreement is not None:
        # Four digits: 0.9889 printed as 0.99 would read as met.
        check("int8 top-1 agreement with torch fp32 (test split)", agreement, 0.99, digits=4)
    return lines


def print_report(report: dict[str, Any], runs: list[Run], args: argparse.Namespace) -> None:
    print()
    print(f"machine: {report['machine']}")
    print(bench_model.agreement_report(Path(report["model"]["path"])))
    print(f"settings: {report['settings']}")
    print_raw_table(report)
    print_served_table(report)
    print("\ntargets:")
    print("\n".join(target_lines(report, runs, args)) or "  (none measured)")
    codes = report["exit_codes"]
    print(f"exit codes after SIGTERM: {', '.join(f'{k} {v}' for k, v in codes.items())}")


# -- the run ----------------------------------------------------------------------------
def prepare_model(args: argparse.Namespace, tmp: Path) -> Path:
    if args.version_dir:
        return Path(args.version_dir)
    if args.untrained:
        from benchmarks.backends_raw import export, publish

        version_dir = publish(tmp / "models", 224)
        print(f"exporting untrained {version_dir} ...", file=sys.stderr, flush=True)
        export(version_dir, 224)
        return version_dir
    recipe = bench_model.recipe_from(args)
    return bench_model.trained_version(args.work, recipe, args.device, log=_log)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def model_info(version_dir: Path) -> dict[str, Any]:
    metadata = read_metadata(version_dir)
    int8 = metadata.export("int8")
    measured = int8 is not None and int8.agreement is not None and int8.agreement.split != "none"
    return {
        "path": str(version_dir),
        "input_size": metadata.preprocessing.input_size,
        "exports": [e.precision for e in metadata.exports],
        "int8_agreement": int8.agreement.top1_agreement if measured else None,  # type: ignore[union-attr]
    }


def measure_all(
    version_dir: Path,
    specs: list[str],
    runs: list[Run],
    caps: Capabilities,
    tmp: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    threads = args.threads or usable_cores()
    images = {k: write_photos(size, 8, tmp / "images", k) for k, size in IMAGE_SETS.items()}
    servers = make_servers(runs, version_dir, tmp, args)
    raw_figures: dict[str, list[list[tuple[float, float]]]] = {spec: [] for spec in specs}
    rows: list[tuple[Run, dict[str, Any]]] = []
    exit_codes: dict[str, int | None] = {}
    load_before = os.getloadavg()[0]
    try:
        for server in servers.values():
            server.start()
        raw = Raw(version_dir, specs, caps, threads, args.max_batch_size)
        for server in servers.values():
            server.wait_ready()
            check_answer(server, version_dir, images["480"][0])
            server.pause()
        raw.warmup_s = args.raw_warmup
        for round_index in range(args.rounds):
            figures, round_rows = one_round(round_index, specs, runs, raw, servers, images, args)
            for spec, values in figures.items():
                raw_figures[spec].append(values)
            rows += round_rows
    finally:
        for key, server in servers.items():
            exit_codes[key] = server.stop()
    report = assemble(version_dir, runs, raw_figures, rows, exit_codes, threads, args)
    report["machine"] += (
        f"; load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    return report


def assemble(
    version_dir: Path,
    runs: list[Run],
    raw_figures: dict[str, list[list[tuple[float, float]]]],
    rows: list[tuple[Run, dict[str, Any]]],
    exit_codes: dict[str, int | None],
    threads: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    raw: dict[str, dict[str, Any]] = {}
    for spec, rounds in raw_figures.items():
        flat = [value for values in rounds for value in values]
        raw[spec] = {
            "images_per_s": statistics.mean(v[0] for v in flat),
            "cpu_ms_per_image": statistics.mean(v[1] for v in flat) * 1000,
            "round_means": [statistics.mean(v[0] for v in values) for values in rounds],
        }
    eager_by_round: dict[int, float] = {}
    if EAGER in raw_figures:
        eager_by_round = dict(enumerate(raw[EAGER]["round_means"]))
    served_rows = {
        run.label: aggregate([row for r, row in rows if r == run], eager_by_round) for run in runs
    }
    return {
        "machine": f"{usable_cores()} usable CPU cores, torch {torch.__version__}, device "
        f"{args.device}",
        "model": model_info(version_dir),
        "threads": threads,
        "settings": {
            "max_batch_size": args.max_batch_size,
            "max_batch_delay_ms": args.max_batch_delay_ms,
            "clients": args.clients,
            "multi": args.multi,
            "rounds": args.rounds,
            "duration_s": args.duration,
            "raw_seconds": args.raw_seconds,
        },
        "raw": raw,
        "served": served_rows,
        "exit_codes": exit_codes,
    }


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=_HelpFormatter,
    )
    bench_model.add_recipe_arguments(parser)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--version-dir", type=Path, help="serve this published version instead")
    model.add_argument("--untrained", action="store_true", help="random weights (speed only)")
    parser.add_argument(
        "--backends", nargs="+", choices=list(SPECS), help="default: all the device supports"
    )
    parser.add_argument(
        "--litserve",
        nargs="*",
        choices=list(SPECS),
        default=["torch-fp32", "ort-int8"],
        help="backends also served by LitServe (none: no LitServe)",
    )
    parser.add_argument("--naive", action="store_true", help="also the naive FastAPI endpoint")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--multi", type=int, default=32, help="images per request (0: none)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--duration", type=float, default=15.0, help="measured s per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured s per run")
    parser.add_argument("--raw-seconds", type=float, default=5.0, help="per raw measurement")
    parser.add_argument("--raw-warmup", type=float, default=1.0, help="unmeasured, before each")
    parser.add_argument("--threads", type=int, default=0, help="raw intra-op threads (0: cores)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (also training)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--json", type=Path, help="also write the report here")
    return parser


def choose_specs(
    args: argparse.Namespace, caps: Capabilities, parser: argparse.ArgumentParser
) -> list[str]:
    supported = supported_specs(caps)
    wanted = args.backends or supported
    unsupported = [key for key in wanted if key not in supported]
    if unsupported:
        parser.error(f"--backends {' '.join(unsupported)}: not on {caps.device} here")
    return [key for key in SPECS if key in wanted]


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    try:
        caps = probe_capabilities(resolve_device(args.device))
    except ValueError as exc:  # SettingsError: no such device here
        parser.error(f"--device {args.device}: {exc}")
    specs = choose_specs(args, caps, parser)
    runs = plan_runs(specs, [s for s in args.litserve if s in specs], args.naive, args)
    minutes = estimated_seconds(runs, specs, args) / 60
    print(
        f"{len(runs)} served runs per round over {', '.join(specs)}; about {minutes:.0f} min "
        "of measuring (plus training the model once)",
        file=sys.stderr,
    )
    if args.dry_run:
        for run in runs:
            print(f"  {run.label}")
        return
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp_name:
        tmp = Path(tmp_name)
        version_dir = prepare_model(args, tmp)
        shipped = model_info(version_dir)["exports"]
        missing = [
            s
            for s in specs
            if SPECS[s].choice.backend == "onnxruntime" and SPECS[s].choice.precision not in shipped
        ]
        if missing:
            parser.error(f"{version_dir} ships no ONNX file for {', '.join(missing)}")
        report = measure_all(version_dir, specs, runs, caps, tmp, args)
    print_report(report, runs, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
