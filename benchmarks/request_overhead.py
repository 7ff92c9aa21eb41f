"""CPU time per image that the service spends outside the network, by step.

Counts CPU time (``time.process_time``: every thread of this process), not wall time, so
that the figures hold on a machine shared with other work. Steps:

- ``decode``: ``decode_image`` of one upload (a 480x360 JPEG and a 2-megapixel phone-size
  JPEG, both with photo-like detail), on one thread;
- ``multipart``: parsing a one-file multipart body with the service's streaming parser;
- ``assemble``: stacking 8 decoded images and normalising them into torch's input;
- ``json``: turning a 1-image ``PredictResponse`` into response bytes the way FastAPI does
  for a returned model, and the way the service answers;
- ``request``: whole requests through the ASGI app in this process (no socket, no HTTP
  parsing), with the network replaced by a function that returns zeros, so that every CPU
  second counted is overhead: 16 concurrent single-image requests, and requests of 32
  images. ``request - decode`` is the overhead of everything but decoding.

    python benchmarks/request_overhead.py            # about a minute
    python benchmarks/request_overhead.py --seconds 5 --json out.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import TypeAdapter
from starlette.requests import Request

from app.backends import TorchBackend
from app.images import decode_image
from app.inference import InferenceModel
from app.main import create_app
from app.prediction import image_prediction
from app.schemas import PredictResponse
from app.service import Service
from app.settings import load_settings
from app.uploads import UploadLimits, read_files
from benchmarks.backends_raw import publish_random
from benchmarks.photos import PHONE_2MP, WEB, photo_like
from wastenet.artifacts import load_version
from wastenet.classes import CLASS_NAMES
from wastenet.schema import Preprocessing

MODEL = "waste-resnet18-cbam"
BOUNDARY = b"overheadboundary0123456789"
PREP = Preprocessing()  # 256 -> 224, the default


def multipart(files: list[bytes]) -> bytes:
    parts = []
    for i, data in enumerate(files):
        head = (
            f'--{BOUNDARY.decode()}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="img{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        parts.append(head + data + b"\r\n")
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


def scope(path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"multipart/form-data; boundary=" + BOUNDARY),
            (b"content-length", str(len(body)).encode()),
            (b"host", b"127.0.0.1"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


def receiver(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    return receive


def cpu_per_call(fn: Callable[[], Any], seconds: float) -> float:
    """CPU microseconds per call of ``fn``, after one unmeasured call."""
    fn()
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return (time.process_time() - cpu) / count * 1e6


def publish(repo: Path) -> None:
    publish_random(repo, MODEL, PREP)


def null_network(service: Service) -> None:
    """Replace every served network by zeros, so request CPU time is all overhead."""
    registry = service.lifecycle.require_registry()
    for model in registry.models.values():
        for entry in model.versions.values():
            if entry.served is not None:
                served = entry.served.model
                served.backend.run_network = lambda x, n=served.num_classes: np.zeros(
                    (x.shape[0], n), np.float32
                )


async def serve_requests(
    app: FastAPI, body: bytes, images_per_request: int, concurrency: int, seconds: float
) -> float:
    """CPU microseconds per image of whole requests (``concurrency`` in flight)."""
    statuses: list[int] = []

    async def one() -> None:
        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope("/v1/predict", body), receiver(body), send)

    async def client(deadline: float, counter: list[int]) -> None:
        while time.perf_counter() < deadline:
            await one()
            counter[0] += images_per_request

    await asyncio.gather(*(one() for _ in range(concurrency)))  # warm-up
    counter = [0]
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(client(deadline, counter) for _ in range(concurrency)))
    used = time.process_time() - cpu
    bad = [s for s in statuses if s != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. status {bad[0]}")
    return used / counter[0] * 1e6


async def request_steps(
    repo: Path, photos: dict[str, bytes], seconds: float, env: dict[str, Any]
) -> dict[str, float]:
    settings = load_settings(
        model_dir=repo,
        bootstrap_demo=False,
        max_queue_images=64,
        max_files_per_request=32,
        log_level="warning",
        access_log=False,
        **env,
    )
    app = create_app(settings)
    service: Service = app.state.service
    results: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        while not service.lifecycle.started:
            await asyncio.sleep(0.05)
        null_network(service)
        for kind, data in photos.items():
            single = multipart([data])
            results[f"request {kind}, 16 x 1 image"] = await serve_requests(
                app, single, 1, 16, seconds
            )
            many = multipart([data] * 32)
            results[f"request {kind}, 1 x 32 images"] = await serve_requests(
                app, many, 32, 1, seconds
            )
    return results


def assemble_step(repo: Path, photo: bytes, seconds: float) -> float:
    """Stack 8 decoded images into the batch buffer and normalise them (torch, CPU)."""
    torch.set_num_threads(1)
    loaded = load_version(repo / MODEL / "1")
    backend = TorchBackend(loaded.model, torch.device("cpu"), "fp32", PREP, 12, 8)
    model = InferenceModel(loaded, backend, 8)
    images = [decode_image(photo, "x.jpg", PREP, 10**8).array for _ in range(8)]
    return cpu_per_call(lambda: backend.normalise(model.stack(images)), seconds) / 8


def multipart_step(data: bytes, seconds: float) -> float:
    body = multipart([data])
    limits = UploadLimits(max_request_bytes=1 << 26, max_file_bytes=1 << 25, max_files=64)
    loop = asyncio.new_event_loop()

    def parse() -> None:
        request = Request(scope("/v1/predict", body), receiver(body))
        loop.run_until_complete(read_files(request, limits))

    try:
        return cpu_per_call(parse, seconds)
    finally:
        loop.close()


def json_steps(seconds: float) -> dict[str, float]:
    """A 1-image, top-3 answer: FastAPI's path for a returned model vs bytes from pydantic.

    FastAPI (0.115+) validates a returned model against ``response_model`` with a
    TypeAdapter (``from_attributes=True``) and dumps it with the same adapter; that is
    reproduced here without its private classes.
    """
    top = [(5, 0.91), (2, 0.05), (3, 0.01)]
    response = PredictResponse(
        model=MODEL,
        version=1,
        backend="torch",
        precision="fp32",
        predictions=[image_prediction("img0.jpg", top, CLASS_NAMES)],
    )
    adapter: TypeAdapter[PredictResponse] = TypeAdapter(PredictResponse)

    def fastapi_path() -> None:
        adapter.dump_json(adapter.validate_python(response, from_attributes=True))

    def direct() -> None:
        PredictResponse.__pydantic_serializer__.to_json(response)

    return {
        "json, FastAPI response_model path": cpu_per_call(fastapi_path, seconds),
        "json, pydantic to_json": cpu_per_call(direct, seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    photos = {"480x360 JPEG": photo_like(*WEB, seed=0), "2 MP JPEG": photo_like(*PHONE_2MP, seed=1)}
    figures: dict[str, float] = {}
    for kind, data in photos.items():
        figures[f"decode {kind}"] = cpu_per_call(
            lambda d=data: decode_image(d, "x.jpg", PREP, 10**8), args.seconds
        )
    figures["multipart, 1 file of 2 MP"] = multipart_step(photos["2 MP JPEG"], args.seconds)
    figures.update(json_steps(args.seconds))
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        publish(repo)
        figures["assemble, batch of 8 (torch fp32)"] = assemble_step(
            repo, photos["480x360 JPEG"], args.seconds
        )
        env = {"max_batch_size": 8, "torch_threads": 1, "decode_threads": 2}
        figures.update(asyncio.run(request_steps(repo, photos, args.seconds, env)))
    for kind in photos:
        for shape in ("16 x 1 image", "1 x 32 images"):
            key = f"request {kind}, {shape}"
            figures[f"{key} - decode"] = figures[key] - figures[f"decode {kind}"]
    width = max(map(len, figures))
    print(f"{'step':<{width}}  CPU us/image")
    for name, value in figures.items():
        print(f"{name:<{width}}  {value:10.0f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
