"""A light HTTP load generator for serve_load.py (stdlib asyncio, uvloop when installed).

It runs in its own process so that it does not share the service's event loop, and it is
cheap per request: every request is pre-built bytes (headers and a multipart body with
pre-encoded images) written on a keep-alive connection; a response is read by its
Content-Length and only its status line is parsed.

Modes:
- ``closed``: ``--clients`` connections, each sending its next request when the previous
  answer arrives.
- ``open``: requests started at ``--rate`` per second regardless of answers (overload
  tests), each on an idle keep-alive connection or a new one.

Prints one JSON object: counts by status, latencies (seconds) of 200s and of others,
and the throughput. Only requests that end within the measured window (after
``--warmup`` seconds) count. Closed loop: each client's rate is its answers in the window
/ (time from the start of the first of them to the last answer), summed over clients;
this has no edge error even when a request takes a large part of the window. Open loop:
answers in the window / window length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any


def build_request(host: str, port: int, path: str, images: list[bytes]) -> bytes:
    boundary = uuid.uuid4().hex
    parts = []
    for i, data in enumerate(images):
        parts.append(
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="files"; filename="img{i}.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode()
    return head + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def roundtrip(self, request: bytes) -> tuple[int, bool]:
        """Send one request; return (status, keep-alive)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        keep_alive = True
        for line in head.split(b"\r\n")[1:]:
            lower = line.lower()
            if lower.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
            elif lower.startswith(b"connection:") and b"close" in lower:
                keep_alive = False
        if length:
            await self.reader.readexactly(length)
        return status, keep_alive

    def close(self) -> None:
        self.writer.close()


class Results:
    def __init__(self, warmup_until: float, stop_at: float) -> None:
        self.warmup_until = warmup_until
        self.stop_at = stop_at
        self.statuses: Counter[str] = Counter()
        self.ok_latencies: list[float] = []
        self.other_latencies: list[float] = []
        self.errors: Counter[str] = Counter()

        self.ok_spans: dict[int, list[tuple[float, float]]] = {}  # client -> its 200s
        self.total_ok = 0  # 200s including the warm-up, for CPU-time accounting

    def measuring(self, now: float) -> bool:
        return self.warmup_until <= now <= self.stop_at

    def record(self, started: float, status: int, client: int = 0) -> None:
        finished = time.perf_counter()
        if status == 200:
            self.total_ok += 1
        if not self.measuring(finished):
            return
        self.statuses[str(status)] += 1
        if status == 200:
            self.ok_latencies.append(finished - started)
            self.ok_spans.setdefault(client, []).append((started, finished))
        else:
            self.other_latencies.append(finished - started)

    def error(self, exc: BaseException) -> None:
        if self.measuring(time.perf_counter()):
            self.errors[type(exc).__name__] += 1

    def closed_loop_rate(self) -> float:
        """Requests/s: sum over clients of answers / (last answer - first one's start).

        A closed-loop client sends back to back, so its counted requests fill that span;
        it holds for a single slow request (one client sending 32 images) too.
        """
        rate = 0.0
        for spans in self.ok_spans.values():
            rate += len(spans) / (spans[-1][1] - spans[0][0])
        return rate

    def open_loop_rate(self, window_s: float) -> float:
        return sum(len(t) for t in self.ok_spans.values()) / window_s


async def closed_loop(args: argparse.Namespace, requests: list[bytes], results: Results) -> None:
    async def client(index: int) -> None:
        request = requests[index % len(requests)]  # clients send different images
        conn = await Connection.open(args.host, args.port)
        while time.perf_counter() < results.stop_at:
            started = time.perf_counter()
            try:
                status, keep_alive = await conn.roundtrip(request)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                results.error(exc)
                conn.close()
                conn = await Connection.open(args.host, args.port)
                continue
            results.record(started, status, index)
            if not keep_alive:
                conn.close()
                conn = await Connection.open(args.host, args.port)
        conn.close()

    await asyncio.gather(*(client(i) for i in range(args.clients)))


async def open_loop(args: argparse.Namespace, requests: list[bytes], results: Results) -> None:
    idle: list[Connection] = []
    tasks: set[asyncio.Task[None]] = set()
    skipped = sent = 0

    async def one(scheduled: float, request: bytes) -> None:
        conn = idle.pop() if idle else await Connection.open(args.host, args.port)
        try:
            status, keep_alive = await conn.roundtrip(request)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            results.error(exc)
            conn.close()
            return
        results.record(scheduled, status)
        if keep_alive:
            idle.append(conn)
        else:
            conn.close()

    interval = 1.0 / args.rate
    next_at = time.perf_counter()
    while next_at < results.stop_at:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= args.max_connections:
            skipped += 1
        else:
            request = requests[sent % len(requests)]
            task = asyncio.get_running_loop().create_task(one(next_at, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        next_at += interval
        sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=args.drain_timeout)
    for conn in idle:
        conn.close()
    if skipped:
        results.errors["client_connection_cap"] += skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/predict")
    parser.add_argument("--images", type=Path, nargs="+", required=True, help="JPEG files")
    parser.add_argument("--per-request", type=int, default=1, help="images per request")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--clients", type=int, default=16, help="closed loop: connections")
    parser.add_argument("--rate", type=float, default=100.0, help="open loop: requests/s")
    parser.add_argument("--max-connections", type=int, default=512, help="open loop cap")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not measured")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args()

    payloads = [p.read_bytes() for p in args.images]
    # One request per starting image: request k holds images k, k+1, ... (cyclically).
    requests = [
        build_request(
            args.host,
            args.port,
            args.path,
            [payloads[(k + i) % len(payloads)] for i in range(args.per_request)],
        )
        for k in range(len(payloads))
    ]
    start = time.perf_counter()
    results = Results(start + args.warmup, start + args.warmup + args.duration)
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.mode == "closed":
        runner(closed_loop(args, requests, results))
        requests_per_s = results.closed_loop_rate()
    else:
        runner(open_loop(args, requests, results))
        requests_per_s = results.open_loop_rate(args.duration)
    json.dump(
        {
            "mode": args.mode,
            "clients": args.clients,
            "rate": args.rate if args.mode == "open" else None,
            "per_request": args.per_request,
            "duration_s": args.duration,
            "requests_per_s": requests_per_s,
            "images_per_s": requests_per_s * args.per_request,
            "statuses": dict(results.statuses),
            "total_ok_requests": results.total_ok,
            "client_cpu_s": time.process_time(),
            "errors": dict(results.errors),
            "ok_latencies": results.ok_latencies,
            "other_latencies": results.other_latencies,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
