"""HEAD is answered like GET without the body, on every GET route (probes use HEAD)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.conftest import link_tree
from tests.app.v2.conftest import LiveServer, live_server


@pytest.fixture(scope="module")
def server(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    repo = tmp_path_factory.mktemp("head") / "models"
    link_tree(template_repo, repo)
    with live_server(repo) as live:
        yield live


def get_paths(spec: dict[str, Any]) -> list[str]:
    """Every documented GET path, its parameters filled with their documented example."""
    paths = []
    for template, operations in spec["paths"].items():
        if "get" not in operations:
            continue
        path = template
        for parameter in operations["get"].get("parameters", []):
            if parameter["in"] == "path":
                example = parameter["schema"].get("examples", ["x"])[0]
                path = path.replace("{" + parameter["name"] + "}", str(example))
        paths.append(path)
    return paths


# Headers that legitimately differ between two answers.
VOLATILE = {"date", "content-length"}


def test_head_answers_every_get_route_like_get_without_the_body(server: LiveServer) -> None:
    spec = httpx.get(f"{server.base}/openapi.json").json()
    paths = get_paths(spec)
    assert {"/health/live", "/health/ready", "/v1/models", "/metrics", "/v2"} <= set(paths)
    with httpx.Client(base_url=server.base) as client:
        for path in paths:
            get, head = client.get(path), client.head(path)
            assert head.status_code == get.status_code, path
            assert head.content == b"", path
            assert head.headers["content-type"] == get.headers["content-type"], path
            if path != "/metrics":  # its counters move between the two requests
                assert head.headers["content-length"] == get.headers["content-length"], path
            same = {k: v for k, v in head.headers.items() if k not in VOLATILE}
            assert same == {k: v for k, v in get.headers.items() if k not in VOLATILE}, path


def test_head_keeps_errors_and_statuses(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base) as client:
        missing = client.head("/v1/models/nope")
        assert missing.status_code == 404 and missing.content == b""
        assert missing.headers["content-type"] == "application/json"
        assert client.head("/nothing/here").status_code == 404
        # No GET route there: HEAD is a method like any other, refused with what is allowed.
        post_only = client.head("/v1/predict")
        assert post_only.status_code == 405 and post_only.headers["allow"] == "POST"
        listed = client.request("PATCH", "/v1/models")
        assert listed.status_code == 405 and listed.headers["allow"] == "GET, HEAD"
        assert "method PATCH is not allowed" in listed.json()["error"]["message"]
