"""Admin endpoints behind WASTE_ADMIN_TOKEN: the token, rescans, load and unload, aliases."""

from __future__ import annotations

import json
from pathlib import Path

from app.schemas import ScanResult
from tests.app.conftest import MODEL, TOKEN, add_version, replace_file, service_of
from tests.app.test_api import assert_error
from tests.app.test_versions import MakeClient, predict_version, states

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_admin_is_disabled_without_a_token(make_client: MakeClient) -> None:
    client = make_client()
    assert_error(
        client.post("/v1/admin/rescan", headers=AUTH), 403, "admin_disabled", "WASTE_ADMIN_TOKEN"
    )


def test_admin_needs_the_right_bearer_token(make_client: MakeClient) -> None:
    client = make_client(admin_token=TOKEN)
    missing = client.post("/v1/admin/rescan")
    assert_error(missing, 401, "unauthorized", "Bearer")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    assert_error(client.post("/v1/admin/rescan", headers=wrong), 403, "invalid_token")
    assert_error(
        client.post(f"/v1/admin/models/{MODEL}/versions/1/load", headers=wrong),
        403,
        "invalid_token",
    )
    assert client.post("/v1/admin/rescan", headers=AUTH).status_code == 200


def test_admin_rescan_picks_up_a_new_version_and_unloads_the_superseded_one(
    repo: Path, make_client: MakeClient
) -> None:
    client = make_client(admin_token=TOKEN)
    add_version(repo, MODEL, repo / MODEL / "1")
    report = client.post("/v1/admin/rescan", headers=AUTH).json()
    assert report["added"] == [f"{MODEL} v3"]
    assert report["loaded"] == [f"{MODEL} v3"]
    assert report["unloaded"] == [f"{MODEL} v2"]
    assert states(client) == {1: "available", 2: "available", 3: "ready"}
    assert predict_version(client).json()["version"] == 3  # type: ignore[attr-defined]


def test_admin_load_unload_and_failed_load(repo: Path, make_client: MakeClient) -> None:
    client = make_client(admin_token=TOKEN)
    loaded = client.post(f"/v1/admin/models/{MODEL}/versions/1/load", headers=AUTH)
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    assert loaded.json()["pinned"] is True
    assert predict_version(client, "1").json()["version"] == 1  # type: ignore[attr-defined]
    unloaded = client.post(f"/v1/admin/models/{MODEL}/versions/1/unload", headers=AUTH)
    assert unloaded.json()["state"] == "available"
    assert_error(predict_version(client, "1"), 503, "version_not_loaded")
    assert_error(
        client.post(f"/v1/admin/models/{MODEL}/versions/9/load", headers=AUTH),
        404,
        "unknown_version",
    )
    assert_error(
        client.post("/v1/admin/models/nope/versions/1/load", headers=AUTH), 404, "unknown_model"
    )
    assert_error(
        client.post(f"/v1/admin/models/{MODEL}/versions/x/load", headers=AUTH),
        422,
        "invalid_request",
    )
    weights = repo / MODEL / "1" / "weights.safetensors"
    replace_file(weights, weights.read_bytes()[:-10])
    assert_error(
        client.post(f"/v1/admin/models/{MODEL}/versions/1/load", headers=AUTH),
        422,
        "load_failed",
        "sha256 mismatch",
    )
    assert predict_version(client).status_code == 200  # type: ignore[attr-defined]


def test_admin_sets_and_deletes_aliases_in_aliases_json(
    repo: Path, make_client: MakeClient
) -> None:
    client = make_client(admin_token=TOKEN)
    response = client.put(
        f"/v1/admin/models/{MODEL}/aliases/production", json={"version": 1}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    assert response.json()["default_version"] == 1
    assert json.loads((repo / MODEL / "aliases.json").read_text()) == {"production": 1}
    assert states(client) == {1: "ready", 2: "ready"}
    assert predict_version(client).json()["version"] == 1  # type: ignore[attr-defined]
    assert_error(
        client.put(f"/v1/admin/models/{MODEL}/aliases/latest", json={"version": 1}, headers=AUTH),
        422,
        "invalid_alias",
    )
    assert_error(
        client.put(f"/v1/admin/models/{MODEL}/aliases/qa", json={"version": 7}, headers=AUTH),
        404,
        "unknown_version",
    )
    assert_error(
        client.put(f"/v1/admin/models/{MODEL}/aliases/qa", json={"version": 0}, headers=AUTH),
        422,
        "invalid_request",
    )
    deleted = client.delete(f"/v1/admin/models/{MODEL}/aliases/production", headers=AUTH)
    assert deleted.json()["default_version"] == 2 and deleted.json()["aliases"] == {}
    assert_error(
        client.delete(f"/v1/admin/models/{MODEL}/aliases/production", headers=AUTH),
        404,
        "unknown_alias",
    )


def test_admin_answers_are_what_the_catalog_then_shows(make_client: MakeClient) -> None:
    client = make_client(admin_token=TOKEN)
    service = service_of(client)
    assert client.portal is not None  # the app's event loop, where the registry lives
    loaded = client.portal.call(service.admin.load, MODEL, 1)
    assert loaded.pinned is True and loaded.state == "ready"
    assert loaded == service.catalog.model(MODEL).versions[0]
    aliased = client.portal.call(service.admin.set_alias, MODEL, "production", 1)
    assert aliased == service.catalog.model(MODEL)
    assert (aliased.default_selector, aliased.default_version) == ("production", 1)
    unloaded = client.portal.call(service.admin.unload, MODEL, 2)
    assert (unloaded.version, unloaded.state, unloaded.pinned) == (2, "available", False)
    assert unloaded == service.catalog.model(MODEL).versions[1]
    assert client.portal.call(service.admin.rescan, False) == ScanResult(
        added=[], removed=[], loaded=[f"{MODEL} v2"], failed=[], unloaded=[]
    )
