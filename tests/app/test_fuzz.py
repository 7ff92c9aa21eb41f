"""A bounded schema-based fuzz of the running service, from its own OpenAPI document.

Schemathesis reads ``/openapi.json`` from a real server (uvicorn on loopback, MODEL v1 and
v2, OTHER v1: small published networks, so predict, explain and /v2 infer run for real)
and sends what the document allows and what it does not: boundary values of every
parameter and body (its coverage phase), generated requests (fuzzing) and chains of calls
along inferred links (stateful), once without a token and once with the admin token. Every
operation in the document is covered, /v2 and routes added later included. Each response
must match the document: a documented status, a body valid against its schema, the
documented content type and headers (Retry-After on 503, WWW-Authenticate on 401), the
Allow header of a 405. No 5xx but a documented 503 (our check in fuzz_checks.py).

A schema cannot say "a published model" or "a JPEG", so the hooks in fuzz_checks.py give
part of the valid cases a published model's name and version and real images; the test
then asserts that predict, explain and infer answered 200 at least once.

Deterministic (``--generation-deterministic``, one worker) and bounded by the number of
examples per operation: about 1,100 requests and 8 s per run on 2 cores. Not checked: that
every schema-valid request is accepted (positive_data_acceptance): the service refuses
some with reasons no schema states (top_k over the model's classes, bytes that are no
image, the reserved alias 'latest', a version that fails to load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import MODEL, OTHER, TOKEN, link_tree
from tests.app.v2.conftest import live_server

CHECKS = "all"
# not_a_server_error refuses the documented 503s too: no_5xx_but_documented_503 instead.
EXCLUDED_CHECKS = "not_a_server_error,positive_data_acceptance"
MAX_EXAMPLES = 10
RUN_TIMEOUT_S = 120
ROOT = Path(__file__).resolve().parents[2]
REACHES_THE_MODEL = [
    "POST /v1/predict",
    "POST /v1/models/{name}/versions/{version}/predict",
    "POST /v1/models/{name}/explain",
    "POST /v2/models/{name}/infer",
    "POST /v2/models/{name}/versions/{version}/infer",
]


def schemathesis_run(
    base: str, workdir: Path, log: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{base}/openapi.json",
        "--checks",
        CHECKS,
        "--exclude-checks",
        EXCLUDED_CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",
        "--workers",
        "1",
        "--no-shrink",
        "--continue-on-failure",
        "--request-timeout",
        "30",
        "--no-color",
        *options,
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.app.fuzz_checks",
        "PYTHONPATH": str(ROOT),
        "FUZZ_MODELS": f"{MODEL},{OTHER}",
        "FUZZ_LOG": str(log),
    }
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


@pytest.mark.slow
@pytest.mark.parametrize("admin", [False, True], ids=["anonymous", "admin"])
def test_the_running_service_answers_as_its_openapi_document_says(
    template_repo: Path, tmp_path: Path, admin: bool
) -> None:
    repo = tmp_path / "models"
    link_tree(template_repo, repo)
    auth = ["--header", f"Authorization: Bearer {TOKEN}"] if admin else []
    log = tmp_path / "calls.jsonl"
    with live_server(repo, admin_token=TOKEN) as server:
        operations = {
            f"{method.upper()} {path}"
            for path, methods in httpx.get(f"{server.base}/openapi.json").json()["paths"].items()
            for method in methods
        }
        done = schemathesis_run(server.base, tmp_path, log, *auth)
    print(done.stdout[-30000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stdout[-30000:] + done.stderr[-5000:]
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    for line in log.read_text().splitlines():
        call = json.loads(line)
        statuses[call["operation"]][call["status"]] += 1
    assert operations <= set(statuses)  # every operation was called
    # The fuzz reached the model: real images were classified and explained, on /v1 and /v2.
    for operation in REACHES_THE_MODEL:
        assert statuses[operation][200] > 0, (operation, statuses[operation])
    if admin:
        assert statuses["POST /v1/admin/rescan"][200] > 0
    else:
        assert statuses["POST /v1/admin/rescan"].keys() <= {401, 403, 405}
