"""Naive baseline for serve_load.py: a plain FastAPI endpoint, one forward pass per request.

This is how a model is commonly put behind FastAPI: a synchronous endpoint (run by
Starlette's thread pool, so concurrent requests run concurrent forward passes) taking
``UploadFile``s, decoding them and calling the network on that request's images alone.
It uses the same decode, preprocessing and prepared torch network as the service, so the
difference measured is the serving design (batching, one inference thread), nothing else.

    python benchmarks/serve_naive.py --version-dir models/waste-resnet18-cbam/1 --port 8100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile

from app.backends import TorchBackend
from app.images import decode_image
from app.inference import top_k, usable_cores
from wastenet.artifacts import load_version
from wastenet.preprocess import normalize


def build_app(version_dir: Path) -> FastAPI:
    torch.set_num_threads(usable_cores())
    loaded = load_version(version_dir)
    prep, class_names = loaded.metadata.preprocessing, loaded.metadata.class_names
    # The service's prepared network (eval, channels_last), without its batch buffers:
    # concurrent requests here run concurrent forward passes, each on its own tensors.
    prepared = TorchBackend(loaded.model, torch.device("cpu"), "fp32", prep, len(class_names), 1)
    network = prepared.module
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(files: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
        images = []
        for upload in files:
            data = upload.file.read()
            decoded = decode_image(data, upload.filename or "file", prep, 10**8)
            images.append(torch.from_numpy(decoded.array))
        batch = torch.stack(images).permute(0, 3, 1, 2)  # channels_last memory already
        with torch.inference_mode():
            logits = network(normalize(batch, prep)).numpy()
        top = top_k(logits, [3] * len(images))
        return {
            "predictions": [{"label": class_names[t[0][0]], "confidence": t[0][1]} for t in top]
        }

    @app.get("/health/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.version_dir),
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
