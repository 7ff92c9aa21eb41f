"""The same model served by LitServe, as a peer for serve_load.py.

A LitServe ``LitAPI`` with LitServe's own batching (``max_batch_size`` 8 and a
``batch_timeout`` like the service's batch delay, 5 ms), serving the same version through
the same backend code as the service (``app.backends``: torch channels_last, or ONNX
Runtime on the version's exported file) and decoding with the same function
(``app.images.decode_image``: the version's resize and crop, reduced-scale decoding of large
JPEGs). What differs is the serving design: LitServe parses the multipart body in its
HTTP process, sends each request through a queue to one inference worker process, and that
worker decodes the batch's images one after the other before the forward pass.

It answers ``POST /v1/predict`` with one file in the form field ``files`` (what
serve_client.py sends) with the top-3 classes as JSON, and ``GET /health`` once ready.
Each batch adds to two counters written to ``--stats`` (batches, images), so that the
benchmark can report the mean batch size.

    python benchmarks/litserve_peer.py --version-dir models/waste-resnet18-cbam/2 \\
        --backend onnxruntime --precision int8 --port 8200

Needs the ``bench`` extra (litserve).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as python -m app does

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

import litserve as ls
import numpy as np
import torch

from app.backends import Backend, open_backend
from app.images import decode_image
from app.inference import TopK, top_k, usable_cores
from app.selection import Choice, probe_capabilities, resolve_device
from wastenet.artifacts import load_version

MAX_IMAGE_PIXELS = 40_000_000  # the service's default limit


class WasteAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout_ms / 1000.0,
            api_path="/v1/predict",
        )
        self.args = args

    def setup(self, device: str) -> None:
        args = self.args
        threads = args.threads or usable_cores()
        torch.set_num_threads(threads)
        loaded = load_version(args.version_dir)
        self.prep = loaded.metadata.preprocessing
        self.class_names = loaded.metadata.class_names
        caps = probe_capabilities(resolve_device(args.device))
        choice = Choice(args.backend, args.precision)
        self.backend: Backend
        self.backend, _ = open_backend(
            [choice], loaded, caps, threads=threads, max_batch_size=args.max_batch_size
        )
        self.backend.warm(sorted({1, args.max_batch_size}))
        self.buffer = self.backend.host_buffer(args.max_batch_size)
        self.batches = self.images = 0
        self.stats = os.open(args.stats, os.O_WRONLY | os.O_CREAT) if args.stats else None
        self._write_stats()

    def _write_stats(self) -> None:
        if self.stats is not None:  # fixed width, rewritten in place: a few microseconds
            os.pwrite(self.stats, f"{self.batches} {self.images}".encode().ljust(40), 0)

    # No annotation on ``request``: LitServe reads it to choose what the endpoint accepts,
    # and none means the form of a starlette Request (the multipart upload).
    def decode_request(self, request) -> np.ndarray:  # type: ignore[no-untyped-def]
        upload = request["files"]
        data = upload.file.read()
        name = upload.filename or "file"
        array: np.ndarray = decode_image(data, name, self.prep, MAX_IMAGE_PIXELS).array
        return array

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        batch = self.buffer[: len(inputs)]
        np.stack(inputs, out=batch)
        return batch

    def predict(self, x: np.ndarray) -> np.ndarray:
        logits = self.backend.forward(x)
        self.batches += 1
        self.images += len(x)
        self._write_stats()
        return logits

    def unbatch(self, logits: np.ndarray) -> list[TopK]:
        return top_k(logits, [3] * len(logits))

    def encode_response(self, top: TopK) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "precision": self.backend.precision,
            "predictions": [
                {
                    "label": self.class_names[top[0][0]],
                    "confidence": top[0][1],
                    "top_k": [{"label": self.class_names[c], "probability": p} for c, p in top],
                }
            ],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"], default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = cores)")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queues")
    parser.add_argument("--stats", type=Path, help="file for the batch counters")
    args = parser.parse_args()
    device = resolve_device(args.device)
    server = ls.LitServer(
        WasteAPI(args),
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=1,
        workers_per_device=1,
        fast_queue=args.fast_queue,
    )
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
