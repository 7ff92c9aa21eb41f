"""A client generated from the service's own OpenAPI document, as a user would make one.

openapi-python-client generates a package from ``/openapi.json`` of a running server
(offline; ``post_hooks: []`` so that it runs no formatter), and the test drives the same
server through it: list models, predict on several images (one of them broken, so the
result union holds both members), read typed errors, call an admin route with a token and
a /v2 route. Whatever the generator could not read would come back as a warning, a
missing module or an untyped dict, and fail here.
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.app.conftest import MODEL, OTHER, TOKEN, files, image_bytes, link_tree
from tests.app.v2.conftest import LiveServer, live_server

PACKAGE = "waste_client"
GENERATOR = Path(sys.executable).with_name("openapi-python-client")
IMAGES = [
    ("red.png", image_bytes("PNG", (40, 30), color=(200, 30, 30))),
    ("broken.jpg", image_bytes("JPEG")[:50]),
    ("blue.jpg", image_bytes("JPEG", (24, 60), color=(20, 40, 220))),
]


@pytest.fixture(scope="module")
def server(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    repo = tmp_path_factory.mktemp("client") / "models"
    link_tree(template_repo, repo)
    with live_server(repo, admin_token=TOKEN) as live:
        yield live


@pytest.fixture(scope="module")
def client_package(
    server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModuleType]:
    work = tmp_path_factory.mktemp("generated")
    (work / "openapi.json").write_text(httpx.get(f"{server.base}/openapi.json").text)
    (work / "config.yaml").write_text("post_hooks: []\n")
    command = [str(GENERATOR), "generate", "--path", "openapi.json", "--meta", "none"]
    command += ["--output-path", PACKAGE, "--config", "config.yaml"]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "warning" not in output.lower(), output  # every part of the document was read
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(work))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def module(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.{name}")


def test_the_client_lists_models_and_predicts_as_the_http_api_answers(
    client_package: ModuleType, server: LiveServer
) -> None:
    api = client_package.Client(base_url=server.base)
    models = module(client_package, "models")
    listing = module(client_package, "api.models.list_models").sync(client=api)
    assert isinstance(listing, models.ModelList)
    assert {m.name: m.default_version for m in listing.models} == {MODEL: 2, OTHER: 1}
    assert listing.default_model == MODEL

    body = models.PredictVersionBody(
        files=[
            client_package.types.File(payload=io.BytesIO(data), file_name=name)
            for name, data in IMAGES
        ]
    )
    predict = module(client_package, "api.predict.predict_version")
    answer = predict.sync(name=MODEL, version="2", client=api, body=body, top_k=2)
    assert isinstance(answer, models.PredictResponse)
    assert (answer.model, answer.version) == (MODEL, 2)
    red, broken, blue = answer.predictions
    assert isinstance(red, models.ImagePrediction) and isinstance(blue, models.ImagePrediction)
    assert isinstance(broken, models.ImageFailure)
    assert broken.error.code == "undecodable_image" and broken.filename == "broken.jpg"
    # The same answer as the HTTP API gives a plain request.
    raw = httpx.post(
        f"{server.base}/v1/models/{MODEL}/versions/2/predict?top_k=2", files=files(*IMAGES)
    ).json()["predictions"]
    for typed, plain in [(red, raw[0]), (blue, raw[2])]:
        assert (typed.label, typed.class_index) == (plain["label"], plain["class_index"])
        assert typed.confidence == pytest.approx(plain["confidence"])
        assert [s.label for s in typed.top_k] == [s["label"] for s in plain["top_k"]]
        assert len(typed.top_k) == 2


def test_the_client_reads_typed_errors(client_package: ModuleType, server: LiveServer) -> None:
    api = client_package.Client(base_url=server.base)
    models = module(client_package, "models")
    error = module(client_package, "api.models.get_version").sync(
        name=MODEL, version="01", client=api
    )
    assert isinstance(error, models.ErrorResponse)
    assert error.error.code == "invalid_version" and "names no version" in error.error.message
    assert isinstance(error.error.details, models.ErrorDetails)
    details = error.error.details
    assert (details.model, details.requested) == (MODEL, "01")
    assert isinstance(details.version, client_package.types.Unset)  # not sent

    predict = module(client_package, "api.predict.predict_model")
    body = models.PredictModelBody(
        files=[client_package.types.File(payload=io.BytesIO(IMAGES[0][1]), file_name="a.png")]
    )
    response = predict.sync_detailed(name="no-such-model", client=api, body=body)
    assert response.status_code == 404 and isinstance(response.parsed, models.ErrorResponse)
    assert response.parsed.error.code == "unknown_model"


def test_the_client_calls_admin_routes_with_a_token_and_v2_routes(
    client_package: ModuleType, server: LiveServer
) -> None:
    models = module(client_package, "models")
    rescan = module(client_package, "api.admin.rescan")
    refused = rescan.sync_detailed(client=client_package.Client(base_url=server.base))
    assert refused.status_code == 401 and refused.parsed.error.code == "unauthorized"
    admin = client_package.AuthenticatedClient(base_url=server.base, token=TOKEN)
    assert isinstance(rescan.sync(client=admin), models.ScanResult)

    metadata = module(client_package, "api.open_inference_protocol_v2.version_metadata").sync(
        name=MODEL, version="latest", client=admin
    )
    assert isinstance(metadata, models.ModelMetadataResponse)
    assert metadata.versions == ["1", "2"] and metadata.inputs[0].name == "images"
    missing = module(client_package, "api.open_inference_protocol_v2.model_ready").sync_detailed(
        name="no-such-model", client=admin
    )
    assert missing.status_code == 404
    assert isinstance(missing.parsed, models.ProtocolErrorResponse)
    assert "no-such-model" in missing.parsed.error
