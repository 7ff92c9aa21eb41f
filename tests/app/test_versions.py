"""Model versions on disk: the loading rule, broken versions, aliases and polling."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import (
    MODEL,
    OTHER,
    TOKEN,
    add_version,
    files,
    image_bytes,
    replace_file,
    wait_until,
)
from tests.app.test_api import assert_error

JPEG = image_bytes("JPEG")
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MakeClient = Callable[..., TestClient]


def states(client: TestClient, name: str = MODEL) -> dict[int, str]:
    body = client.get(f"/v1/models/{name}").json()
    return {v["version"]: v["state"] for v in body["versions"]}


def predict_version(client: TestClient, spec: str | None = None, name: str = MODEL) -> object:
    path = (
        f"/v1/models/{name}/predict"
        if spec is None
        else (f"/v1/models/{name}/versions/{spec}/predict")
    )
    return client.post(path, files=files(("a.jpg", JPEG)))


def test_tampered_latest_is_reported_and_the_previous_version_serves(
    repo: Path, make_client: MakeClient
) -> None:
    weights = repo / MODEL / "2" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    replace_file(weights, bytes(data))
    client = make_client()
    assert client.get("/health/ready").json()["models"] == {MODEL: 1, OTHER: 1}
    version = next(
        v for v in client.get(f"/v1/models/{MODEL}").json()["versions"] if v["version"] == 2
    )
    assert version["state"] == "failed"
    assert "sha256 mismatch" in version["error"] and "weights.safetensors" in version["error"]
    response = predict_version(client, "2")
    assert_error(response, 503, "version_failed", "v2 failed to load", "sha256 mismatch")
    assert response.headers["retry-after"].isdigit()
    assert predict_version(client, "latest").json()["version"] == 1  # type: ignore[attr-defined]
    assert predict_version(client, name=OTHER).status_code == 200  # type: ignore[attr-defined]


def test_wrong_shapes_and_incomplete_metadata_fail_with_their_reasons(
    repo: Path, make_client: MakeClient
) -> None:
    meta_path = repo / MODEL / "2" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["architecture"]["cbam"] = "none"  # the weights hold CBAM parameters
    replace_file(meta_path, json.dumps(meta).encode())
    other_meta = repo / OTHER / "1" / "model.json"
    broken = json.loads(other_meta.read_text())
    del broken["class_names"]
    replace_file(other_meta, json.dumps(broken).encode())
    client = make_client(ready=False)
    info = client.get(f"/v1/models/{MODEL}/versions/2").json()
    assert info["state"] == "failed"
    assert "do not fit the architecture" in info["error"]
    other = client.get(f"/v1/models/{OTHER}/versions/1").json()
    assert "class_names" in other["error"] and "incomplete or invalid metadata" in other["error"]
    assert other["metadata"] is None and "class_names" in other["metadata_error"]
    # The default model answers (v1), so the service is ready; the other model is not.
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["models"] == {MODEL: 1, OTHER: None}
    assert "no ready version" in ready.json()["not_ready"][OTHER]
    error = assert_error(client.get(f"/health/ready/{OTHER}"), 503, "not_ready", OTHER)
    assert any("no ready version" in r for r in error["details"]["reasons"])  # type: ignore[index]
    assert client.get(f"/health/ready/{MODEL}").status_code == 200
    assert predict_version(client).json()["version"] == 1  # type: ignore[attr-defined]


def test_production_alias_is_the_default_and_is_loaded(repo: Path, make_client: MakeClient) -> None:
    (repo / MODEL / "aliases.json").write_text(json.dumps({"production": 1, "staging": 2}))
    client = make_client()
    assert states(client) == {1: "ready", 2: "ready"}
    body = client.get(f"/v1/models/{MODEL}").json()
    assert body["default_selector"] == "production" and body["default_version"] == 1
    assert predict_version(client).json()["version"] == 1  # type: ignore[attr-defined]
    assert client.post("/v1/predict", files=files(("a", JPEG))).json()["version"] == 1
    assert predict_version(client, "staging").json()["version"] == 2  # type: ignore[attr-defined]
    assert predict_version(client, "latest").json()["version"] == 2  # type: ignore[attr-defined]


def test_unreadable_aliases_at_start_leave_the_default_unknown(
    repo: Path, make_client: MakeClient
) -> None:
    # No good copy was ever read: serving 'latest' could move production traffic.
    (repo / MODEL / "aliases.json").write_text('{"production": "three"}')
    client = make_client(ready=False)
    body = client.get(f"/v1/models/{MODEL}").json()
    assert "must point to a positive integer" in body["aliases_error"]
    assert (body["default_selector"], body["default_version"], body["aliases"]) == (None, None, {})
    for response in (predict_version(client), predict_version(client, "production")):
        assert_error(response, 503, "aliases_unreadable", "aliases.json", "must point to")
    assert_error(client.get("/health/ready"), 503, "not_ready", "aliases.json")
    assert predict_version(client, "2").json()["version"] == 2  # type: ignore[attr-defined]
    assert predict_version(client, "latest").json()["version"] == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "broken",
    [b'{"production": 3', b"\xff\xfe\x00{", b"[2]", b'{"production": "two"}', b""],
    ids=["truncated", "not-utf8", "not-an-object", "not-a-number", "empty"],
)
def test_a_broken_aliases_file_keeps_the_last_good_aliases(
    repo: Path, make_client: MakeClient, broken: bytes
) -> None:
    add_version(repo, MODEL, repo / MODEL / "1")  # v3
    aliases = repo / MODEL / "aliases.json"
    aliases.write_text(json.dumps({"production": 2}))
    client = make_client(admin_token=TOKEN)
    assert states(client) == {1: "available", 2: "ready", 3: "ready"}
    assert predict_version(client).json()["version"] == 2  # type: ignore[attr-defined]
    replace_file(aliases, broken)
    report = client.post("/v1/admin/rescan", headers=ADMIN).json()
    assert report["unloaded"] == [] and report["loaded"] == []
    # Nothing that serves changed: production is still v2, v2 still loaded, still ready.
    assert states(client) == {1: "available", 2: "ready", 3: "ready"}
    assert predict_version(client).json()["version"] == 2  # type: ignore[attr-defined]
    assert client.post("/v1/predict", files=files(("a", JPEG))).json()["version"] == 2
    assert client.get("/health/ready").json()["models"] == {MODEL: 2, OTHER: 1}
    body = client.get(f"/v1/models/{MODEL}").json()
    assert body["aliases"] == {"production": 2} and body["default_version"] == 2
    assert body["aliases_error"].startswith("aliases.json: ")
    assert str(repo) not in body["aliases_error"]
    # A good file is taken again at the next scan.
    replace_file(aliases, json.dumps({"production": 3}).encode())
    report = client.post("/v1/admin/rescan", headers=ADMIN).json()
    assert report["unloaded"] == [f"{MODEL} v2"]
    assert predict_version(client).json()["version"] == 3  # type: ignore[attr-defined]
    assert client.get(f"/v1/models/{MODEL}").json()["aliases_error"] is None


def test_polling_picks_up_new_versions_and_aliases(repo: Path, make_client: MakeClient) -> None:
    client = make_client(poll_interval_s=0.1)
    add_version(repo, MODEL, repo / MODEL / "2")
    wait_until(lambda: states(client).get(3) == "ready", what="v3 ready")
    assert predict_version(client).json()["version"] == 3  # type: ignore[attr-defined]
    (repo / MODEL / "aliases.json").write_text(json.dumps({"production": 1}))
    wait_until(lambda: states(client).get(1) == "ready", what="aliased v1 loaded")
    assert predict_version(client).json()["version"] == 1  # type: ignore[attr-defined]


def test_missing_default_model_keeps_the_service_unready(make_client: MakeClient) -> None:
    client = make_client(ready=False, default_model="not-published")
    assert_error(client.get("/health/ready"), 503, "not_ready", "'not-published'")
    assert_error(client.post("/v1/predict", files=files(("a", JPEG))), 404, "unknown_model")


# '²' made int() fail (500); '١' and '１' silently named v1; '01' gave 404 while '1' worked.
NOT_VERSIONS = ["²", "³", "¹", "١", "１", "01", "0", "-1", "+1", " 1", "1_0", "1.0", "1" * 10]
NOT_VERSIONS += ["9" * 5000]


def test_a_version_is_ascii_digits_without_a_leading_zero_everywhere(
    make_client: MakeClient,
) -> None:
    client = make_client(admin_token=TOKEN)
    for spec in NOT_VERSIONS:
        path = f"/v1/models/{MODEL}/versions/{quote(spec)}"
        error = assert_error(client.get(path), 422, "invalid_version", "1-9 ASCII digits")
        assert len(error["message"]) < 300  # type: ignore[arg-type]
        assert_error(
            client.post(f"{path}/predict", files=files(("a", JPEG))), 422, "invalid_version"
        )
        for action in ("load", "unload"):
            response = client.post(f"{path}/{action}".replace("/v1/", "/v1/admin/"), headers=ADMIN)
            assert_error(response, 422, "invalid_request", "1-9 ASCII digits")
    # Well formed, but naming nothing: 404.
    assert_error(client.get(f"/v1/models/{MODEL}/versions/999999999"), 404, "unknown_version")
    assert_error(client.get(f"/v1/models/{MODEL}/versions/v1"), 404, "unknown_version")
    assert client.get(f"/v1/models/{MODEL}/versions/1").json()["version"] == 1


def test_error_details_carry_a_version_number_as_an_int_and_other_text_as_requested(
    repo: Path, make_client: MakeClient
) -> None:
    client = make_client(admin_token=TOKEN)
    cases = {
        f"/v1/models/{MODEL}/versions/7": (404, {"model": MODEL, "version": 7}),
        f"/v1/models/{MODEL}/versions/staging": (404, {"model": MODEL, "requested": "staging"}),
        f"/v1/models/{MODEL}/versions/01": (422, {"model": MODEL, "requested": "01"}),
    }
    for path, (status, details) in cases.items():
        response = client.get(path)
        assert response.status_code == status, path
        assert response.json()["error"]["details"] == details, path
    unload = client.post(f"/v1/admin/models/{MODEL}/versions/9/unload", headers=ADMIN)
    assert unload.status_code == 404
    assert unload.json()["error"]["details"] == {"model": MODEL, "version": 9}
