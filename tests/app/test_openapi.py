"""The OpenAPI document as a generated client reads it: names, types, error shapes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from app import schemas
from app.main import create_app
from tests.app.conftest import settings_for
from tests.app.test_versions import NOT_VERSIONS
from wastenet.schema import ALIAS_RE, MODEL_NAME_RE, parse_version

Spec = dict[str, Any]


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Spec:
    document: Spec = create_app(settings_for(tmp_path_factory.mktemp("none") / "m")).openapi()
    return document


def operations(spec: Spec) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, methods in spec["paths"].items() for m, op in methods.items()]


def schema_of(spec: Spec, ref: str) -> dict[str, Any]:
    schema: dict[str, Any] = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return schema


def test_operation_ids_are_the_route_functions_names(spec: Spec) -> None:
    ids = {(path, method): op["operationId"] for path, method, op in operations(spec)}
    # FastAPI's own: 'predict_version_v1_models__name__versions__version__predict_post'.
    assert ids[("/v1/models/{name}/versions/{version}/predict", "post")] == "predict_version"
    assert ids[("/v1/models", "get")] == "list_models"
    assert ids[("/v1/admin/models/{name}/aliases/{alias}", "delete")] == "delete_alias"
    assert ids[("/v2/models/{name}/versions/{version}/infer", "post")] == "infer_version"
    assert len(set(ids.values())) == len(ids)
    for operation_id in ids.values():
        assert re.fullmatch(r"[a-z][a-z0-9_]{0,29}", operation_id), operation_id


def test_every_error_response_has_the_shape_the_service_sends(spec: Spec) -> None:
    # FastAPI documented its HTTPValidationError for 422, a shape the service never sends.
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])
    for path, method, op in operations(spec):
        protocol = path.startswith("/v2")
        for status, response in op["responses"].items():
            if status.startswith("2"):
                continue
            ref = response["content"]["application/json"]["schema"]["$ref"]
            expected = "ProtocolErrorResponse" if protocol else "ErrorResponse"
            assert ref.endswith("/" + expected), (path, method, status)
            if status == "503":
                assert response["headers"]["Retry-After"]["required"], (path, method)
            if status == "401":
                assert "WWW-Authenticate" in response["headers"], (path, method)
        if protocol:
            assert "422" not in op["responses"], (path, method)  # /v2 answers 400
        elif op.get("parameters") or "requestBody" in op:
            assert "422" in op["responses"], (path, method)  # validation can fail


def test_the_predict_results_are_a_union_discriminated_by_a_required_status(
    spec: Spec,
) -> None:
    response = spec["paths"]["/v1/predict"]["post"]["responses"]["200"]
    predict = schema_of(spec, response["content"]["application/json"]["schema"]["$ref"])
    items = predict["properties"]["predictions"]["items"]
    assert items["discriminator"]["propertyName"] == "status"
    mapping = items["discriminator"]["mapping"]
    assert set(mapping) == {"ok", "error"}
    for status, ref in mapping.items():
        member = schema_of(spec, ref)
        assert "status" in member["required"]
        assert member["properties"]["status"]["const"] == status


def test_every_response_body_field_is_required_and_no_other_is_sent(spec: Spec) -> None:
    """Response fields are always sent: a generated client needs no 'unset' case."""
    answers = [
        cls.__name__
        for cls in vars(schemas).values()
        if isinstance(cls, type) and issubclass(cls, schemas.Answer) and cls is not schemas.Answer
    ]
    assert {"PredictResponse", "ImagePrediction", "ModelList", "VersionDetail"} <= set(answers)
    for name in [*answers, "ErrorResponse", "ErrorBody"]:
        schema = spec["components"]["schemas"][name]
        assert set(schema["required"]) == set(schema["properties"]), name
        assert schema["additionalProperties"] is False, name


def version_parameters(spec: Spec) -> dict[str, dict[str, Any]]:
    found = {}
    for path, method, op in operations(spec):
        for parameter in op.get("parameters", []):
            if parameter["name"] == "version":
                found[f"{method} {path}"] = parameter["schema"]
    return found


@pytest.mark.parametrize("spec_text", [*NOT_VERSIONS, "1", "12", "999999999", "latest", "prod-1"])
def test_version_parameters_are_strings_with_the_version_rule_as_pattern(
    spec: Spec, spec_text: str
) -> None:
    parameters = version_parameters(spec)
    assert len(parameters) >= 7  # 2 on /v1, 2 admin, 3 on /v2
    is_number = parse_version(spec_text) is not None
    is_alias = ALIAS_RE.fullmatch(spec_text) is not None
    for where, schema in parameters.items():
        # One type everywhere: a path segment is a string (the admin routes said integer).
        assert schema["type"] == "string", where
        accepted = re.search(schema["pattern"], spec_text) is not None
        admin = "/admin/" in where
        assert accepted == (is_number if admin else is_number or is_alias), (where, spec_text)


def test_names_have_their_rules_as_patterns(spec: Spec) -> None:
    for path, method, op in operations(spec):
        for parameter in op.get("parameters", []):
            if parameter["name"] == "name":
                assert parameter["schema"]["pattern"] == MODEL_NAME_RE.pattern, (path, method)
            if parameter["name"] == "alias":
                assert parameter["schema"]["pattern"] == ALIAS_RE.pattern, (path, method)
                assert re.search(ALIAS_RE.pattern, "production")
                assert not re.search(ALIAS_RE.pattern, "Production")


def untyped_objects(node: object, where: str = "") -> list[str]:
    """Where the document has an object with no stated properties or value type."""
    found = []
    if isinstance(node, dict):
        if node.get("additionalProperties") is True or (
            node.get("type") == "object"
            and "properties" not in node
            and "additionalProperties" not in node
        ):
            found.append(where)
        for key, value in node.items():
            found += untyped_objects(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += untyped_objects(item, f"{where}/{i}")
    return found


def test_metadata_and_error_details_are_typed(spec: Spec) -> None:
    components = spec["components"]["schemas"]
    details = components["ErrorBody"]["properties"]["details"]["anyOf"][0]["$ref"]
    assert details.endswith("/ErrorDetails")
    assert {"model", "version", "limit", "setting", "files", "problems"} <= set(
        components["ErrorDetails"]["properties"]
    )
    metadata = components["VersionDetail"]["properties"]["metadata"]["anyOf"][0]["$ref"]
    assert metadata.endswith("/ModelMetadata")
    # What stays open: model.json and its parts may carry keys this reader does not know
    # (extra="allow"), and the Open Inference Protocol's parameters are open maps.
    model_json = {"ModelMetadata", "DataProvenance", "Evaluation", "Quantization"}
    for where in untyped_objects(spec):
        protocol_parameters = re.search(r"/properties/parameters(/anyOf/0)?$", where)
        assert where.removeprefix("/components/schemas/") in model_json or protocol_parameters


def test_the_document_is_built_once_and_describes_head(spec: Spec, tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path / "models"))
    assert app.openapi() is app.openapi()
    assert "HEAD" in spec["info"]["description"]
