"""Admin endpoints behind WASTE_ADMIN_TOKEN: the token, rescans, load and unload, aliases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.schemas import ScanResult
from app.settings import SettingsError, load_settings
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


def tamper(version_dir: Path) -> None:
    weights = version_dir / "weights.safetensors"
    replace_file(weights, weights.read_bytes()[:-10])


def test_an_alias_to_a_version_that_cannot_serve_is_refused_unless_forced(
    repo: Path, make_client: MakeClient
) -> None:
    tamper(repo / MODEL / "1")  # v1 is not loaded yet: the alias call tries it
    client = make_client(admin_token=TOKEN)
    url = f"/v1/admin/models/{MODEL}/aliases/production"
    error = assert_error(
        client.put(url, json={"version": 1}, headers=AUTH), 409, "nothing_to_serve", "sha256"
    )
    assert error["details"] == {
        "model": MODEL,
        "alias": "production",
        "version": 1,
        "state": "failed",
        "reason": states_reason(client, 1),
    }
    assert not (repo / MODEL / "aliases.json").exists()
    assert predict_version(client).json()["version"] == 2  # type: ignore[attr-defined]
    assert client.get("/health/ready").status_code == 200
    # Now v1 is known to have failed: refused again, without another load.
    assert_error(client.put(url, json={"version": 1}, headers=AUTH), 409, "nothing_to_serve")
    forced = client.put(f"{url}?force=true", json={"version": 1}, headers=AUTH)
    assert forced.status_code == 200 and forced.json()["aliases"] == {"production": 1}
    assert_error(predict_version(client), 503, "version_failed")


def states_reason(client: TestClient, version: int) -> str:
    body = client.get(f"/v1/models/{MODEL}/versions/{version}").json()
    return str(body["error"])


def test_unloading_what_the_default_needs_is_refused_unless_forced(
    repo: Path, make_client: MakeClient
) -> None:
    client = make_client(admin_token=TOKEN)
    unload = f"/v1/admin/models/{MODEL}/versions/%d/unload"
    assert_error(
        client.post(unload % 2, headers=AUTH), 409, "nothing_to_serve", "only ready version"
    )
    assert states(client) == {1: "available", 2: "ready"}
    client.put(f"/v1/admin/models/{MODEL}/aliases/production", json={"version": 1}, headers=AUTH)
    assert states(client) == {1: "ready", 2: "ready"}
    assert_error(
        client.post(unload % 1, headers=AUTH), 409, "nothing_to_serve", "alias 'production'"
    )
    assert client.post(unload % 2, headers=AUTH).json()["state"] == "available"  # not needed
    # Without 'production' the default is 'latest', and no version would be ready.
    assert client.post(f"{unload % 1}?force=true", headers=AUTH).json()["state"] == "available"
    assert_error(predict_version(client), 503, "version_not_loaded")
    delete = f"/v1/admin/models/{MODEL}/aliases/production"
    assert_error(client.delete(delete, headers=AUTH), 409, "nothing_to_serve", "'latest'")
    assert client.delete(f"{delete}?force=true", headers=AUTH).json()["aliases"] == {}


def test_aliases_are_not_written_over_an_unreadable_file_unless_forced(
    repo: Path, make_client: MakeClient
) -> None:
    aliases = repo / MODEL / "aliases.json"
    aliases.write_text(json.dumps({"production": 2, "staging": 1}))
    client = make_client(admin_token=TOKEN)
    aliases.write_text('{"production": 2, "staging": 1, "canary"')  # an edit half done
    client.post("/v1/admin/rescan", headers=AUTH)
    url = f"/v1/admin/models/{MODEL}/aliases/canary"
    assert_error(
        client.put(url, json={"version": 1}, headers=AUTH), 409, "aliases_unreadable", "JSON"
    )
    assert aliases.read_text() == '{"production": 2, "staging": 1, "canary"'
    forced = client.put(f"{url}?force=true", json={"version": 1}, headers=AUTH)
    assert forced.json()["aliases_error"] is None
    assert json.loads(aliases.read_text()) == {"canary": 1, "production": 2, "staging": 1}


def put_json(client: TestClient, url: str, body: bytes, token: str | None = None) -> object:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.put(url, content=body, headers=headers)


def test_the_token_is_checked_before_the_body_is_read(make_client: MakeClient) -> None:
    url = f"/v1/admin/models/{MODEL}/aliases/production"
    not_utf8, not_json = b'{"version": "\xff\xfe"}', b'{"version": '
    assert_error(put_json(make_client(), url, not_utf8, TOKEN), 403, "admin_disabled")
    client = make_client(admin_token=TOKEN)
    for body in (not_utf8, not_json):
        assert_error(put_json(client, url, body), 401, "unauthorized")
        assert_error(put_json(client, url, body, "not-the-token-at-all"), 403, "invalid_token")
    response = put_json(client, url, not_utf8, TOKEN)
    assert_error(response, 400, "bad_request", "not UTF-8 (byte 13)")
    assert_error(put_json(client, url, not_json, TOKEN), 422, "invalid_request", "JSON")
    paths = client.get("/openapi.json").json()["paths"]
    assert "400" in paths["/v1/admin/models/{name}/aliases/{alias}"]["put"]["responses"]


def test_an_invalid_admin_token_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "s3cret-short"  # invalid: fewer than 16 characters
    monkeypatch.setenv("WASTE_ADMIN_TOKEN", token)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert token not in message and "s3cret" not in message
    assert "WASTE_ADMIN_TOKEN=<12 characters, not shown>: the admin token must be at least 16" in (
        message
    )
