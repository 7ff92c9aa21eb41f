"""Models and versions as typed answers: states, aliases, defaults and model.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from fastapi.testclient import TestClient

from app.schemas import ModelInfo, ModelList, VersionInfo
from tests.app.conftest import MODEL, OTHER, service_of
from wastenet.artifacts import read_metadata

MakeClient = Callable[..., TestClient]


def test_model_info_lists_every_version_with_its_state_and_aliases(
    repo: Path, make_client: MakeClient
) -> None:
    (repo / MODEL / "aliases.json").write_text(json.dumps({"staging": 1, "canary": 1}))
    catalog = service_of(make_client()).catalog
    info = catalog.model(MODEL)
    v1, v2 = info.versions
    assert info.model_dump(exclude={"versions"}) == {
        "name": MODEL,
        "default_version": 2,
        "default_selector": "latest",
        "latest_ready": 2,
        "aliases": {"canary": 1, "staging": 1},
        "aliases_error": None,
    }
    # Aliased versions are loaded too (the loading rule), the latest is not pinned.
    assert v1.model_dump(exclude={"loaded_at"}) == {
        "version": 1,
        "state": "ready",
        "error": None,
        "aliases": ["canary", "staging"],
        "pinned": False,
        "queue_depth": 0,
        "backend": "torch",  # no exported files: torch fp32 on CPU
        "precision": "fp32",
        "device": "cpu",
        "skipped_backends": [],  # a version that ships no ONNX file skips nothing
    }
    assert v2.version == 2 and v2.state == "ready" and v2.aliases == []
    for version in (v1, v2):
        assert version.loaded_at is not None
        assert datetime.fromisoformat(version.loaded_at).tzinfo is not None


def test_model_list_holds_the_same_answers_as_each_model(make_client: MakeClient) -> None:
    catalog = service_of(make_client()).catalog
    listing = catalog.models()
    assert isinstance(listing, ModelList) and listing.default_model == MODEL
    assert [m.name for m in listing.models] == [OTHER, MODEL]  # name order
    assert listing.models == [catalog.model(OTHER), catalog.model(MODEL)]
    assert all(isinstance(m, ModelInfo) for m in listing.models)
    assert catalog.model(MODEL).versions[0] == VersionInfo(
        version=1,
        state="available",
        error=None,
        aliases=[],
        pinned=False,
        loaded_at=None,
        queue_depth=None,
    )


def test_version_detail_is_model_json_beside_the_state(repo: Path, make_client: MakeClient) -> None:
    client = make_client()
    catalog = service_of(client).catalog
    assert client.portal is not None  # the app's event loop, where the registry lives
    for spec, version, state in (("1", 1, "available"), ("latest", 2, "ready")):
        detail = client.portal.call(catalog.version, MODEL, spec)
        assert (detail.model, detail.version, detail.state) == (MODEL, version, state)
        assert detail.metadata == read_metadata(repo / MODEL / str(version))
        assert detail.metadata_error is None
        body = client.get(f"/v1/models/{MODEL}/versions/{spec}").json()
        assert body["metadata"] == detail.metadata.model_dump(mode="json")  # type: ignore[union-attr]
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    metadata_schema = schemas["VersionDetail"]["properties"]["metadata"]["anyOf"][0]
    assert metadata_schema == {"$ref": "#/components/schemas/ModelMetadata"}
    assert "class_names" in schemas["ModelMetadata"]["required"]
