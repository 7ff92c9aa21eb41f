"""Schemathesis hooks and checks of our own, loaded by the fuzz (tests/app/test_fuzz.py)
through ``SCHEMATHESIS_HOOKS``. The file runs in the fuzzer's process, not the service's.

- :func:`no_5xx_but_documented_503`: the check that replaces ``not_a_server_error``.
- :func:`real_inputs`: a schema cannot say "a JPEG" or "a published model's name", so
  most generated requests would stop at 404 unknown_model or 422 undecodable_image and never
  reach the model. For part of the valid (positive) cases, chosen from the generated data
  itself (deterministic), this names a published model and version (``FUZZ_MODELS``) and
  sends real images, to predict, explain and /v2 infer.
- :func:`record`: every operation's statuses, written to ``FUZZ_LOG``, so the test can
  check that the fuzz did reach the model.
"""

from __future__ import annotations

import base64
import io
import json
import os
import zlib
from typing import Any

import schemathesis
from PIL import Image
from schemathesis import Case, CheckContext, GenerationMode, HookContext, Response

MODELS = [m for m in os.environ.get("FUZZ_MODELS", "").split(",") if m]
VERSIONS = ["1", "latest"]


def _image(fmt: str, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(out, fmt)
    return out.getvalue()


IMAGES = [_image("PNG", (40, 30)), _image("JPEG", (24, 48))]


@schemathesis.check
def no_5xx_but_documented_503(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """No 5xx, except a 503 that the operation documents (not ready, overloaded, a version
    not loaded: the request may succeed later). Schemathesis's own ``not_a_server_error``
    refuses every 5xx, those too; status_code_conformance checks the 503 is documented and
    response_headers_conformance that it carries the documented Retry-After."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(
            f"{response.status_code} from {case.method} {case.formatted_path}: "
            f"{response.text[:500]}"
        )
    return None


def _pick(seed: object, choices: list[Any]) -> Any:
    """One of ``choices`` or None (keep what was generated), chosen from ``seed``."""
    index = zlib.crc32(repr(seed).encode()) % (len(choices) + 1)
    return choices[index] if index < len(choices) else None


@schemathesis.hook("before_call")
def real_inputs(context: HookContext, case: Case, kwargs: dict[str, Any]) -> None:
    meta = case.meta
    modes = {meta.generation.mode} | {c.mode for c in meta.components.values()} if meta else None
    if modes != {GenerationMode.POSITIVE}:
        return  # a case meant to be refused stays as generated
    params = case.path_parameters or {}
    if "name" in params and MODELS:
        params["name"] = _pick(params["name"], MODELS) or params["name"]
    if "version" in params:
        params["version"] = _pick(params["version"], VERSIONS) or params["version"]
    # The body goes through the transport's arguments: schemathesis would count a case body
    # with binary parts that a hook replaced as schema-violating.
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("files"), list) and body["files"]:
        images = _pick(len(body["files"]), [IMAGES, IMAGES[:1]])
        if images is not None:
            count = len(body["files"])
            kwargs["files"] = [
                ("files", (f"{i}.img", images[i % len(images)], "application/octet-stream"))
                for i in range(count)
            ]
    elif (
        isinstance(body, dict)
        and "inputs" in body
        and case.media_type == "application/json"
        and _pick(json.dumps(body, sort_keys=True, default=str), ["images"]) is not None
    ):
        encoded = [base64.b64encode(image).decode() for image in IMAGES]
        kwargs["json"] = {
            "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": encoded}]
        }


@schemathesis.hook
def after_call(context: HookContext, case: Case, response: Response) -> None:
    """Append the operation and status to FUZZ_LOG (one JSON line per call)."""
    log = os.environ.get("FUZZ_LOG")
    if log:
        line = {"operation": f"{case.method} {case.operation.path}", "status": response.status_code}
        with open(log, "a") as out:
            out.write(json.dumps(line) + "\n")
