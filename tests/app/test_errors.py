"""The error codes the service can send, documented in full; the error shapes kept.

The codes are read from app/'s sources, so a new one cannot slip past the README's error
table and the OpenAPI document: every string given as a ``code`` (a keyword, or the
position of a parameter named ``code`` of a function or class in app/), every default of
such a parameter, the ``code`` class attributes of the ServiceError subclasses and the
values of the ``*_CODES`` tables. A ``code`` that is neither a string nor passed through
from another ``code`` fails the test: it could not be checked. Codes under app/v2 are not
collected: the Open Inference Protocol's errors carry a message only.
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.errors import ErrorDetails
from app.main import create_app
from tests.app.conftest import MODEL, TOKEN, link_tree, settings_for, wait_ready
from tests.app.test_api import assert_error

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"
PROTOCOL_ONLY = APP / "v2"


def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted(APP.rglob("*.py"))}


def _slots(trees: dict[Path, ast.Module], parameter: str) -> dict[str, int]:
    """Function or class name -> the position of its ``parameter`` in a call."""
    slots: dict[str, int] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        names = [a.arg for a in item.args.args][1:]  # without self
                        if parameter in names:
                            slots[node.name] = names.index(parameter)
            elif isinstance(node, ast.FunctionDef) and node.name != "__init__":
                names = [a.arg for a in node.args.args]
                if parameter in names:
                    slots[node.name] = names.index(parameter)
    return slots


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def _arguments(trees: dict[Path, ast.Module], parameter: str) -> Iterator[tuple[str, ast.expr]]:
    """("file:line", value) of every argument given for ``parameter`` outside app/v2."""
    slots = _slots(trees, parameter)
    for path, tree in trees.items():
        if PROTOCOL_ONLY in path.parents:
            continue
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == parameter:
                        yield f"{where}:{node.lineno}", keyword.value
                slot = slots.get(_callee(node))
                if slot is not None and len(node.args) > slot:
                    yield f"{where}:{node.lineno}", node.args[slot]
            elif isinstance(node, ast.FunctionDef):
                args = node.args.args
                for arg, default in zip(
                    args[len(args) - len(node.args.defaults) :], node.args.defaults, strict=True
                ):
                    if arg.arg == parameter:
                        yield f"{where}:{node.lineno}", default


def _class_and_table_codes(trees: dict[Path, ast.Module]) -> Iterator[tuple[str, str]]:
    for path, tree in trees.items():
        if PROTOCOL_ONLY in path.parents:
            continue
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if (
                        isinstance(item, ast.AnnAssign | ast.Assign)
                        and "code" in {getattr(t, "id", "") for t in _targets(item)}
                        and isinstance(item.value, ast.Constant)
                    ):
                        yield f"{where}:{item.lineno}", item.value.value
            elif (
                isinstance(node, ast.Assign)
                and any(getattr(t, "id", "").endswith("_CODES") for t in node.targets)
                and isinstance(node.value, ast.Dict)
            ):
                for value in node.value.values:
                    assert isinstance(value, ast.Constant), f"{where}:{node.lineno}"
                    yield f"{where}:{node.lineno}", value.value


def _targets(node: ast.AnnAssign | ast.Assign) -> list[ast.expr]:
    return [node.target] if isinstance(node, ast.AnnAssign) else list(node.targets)


def sent_codes() -> dict[str, set[str]]:
    """Every code the service can send -> where it is raised."""
    trees = _trees()
    codes: dict[str, set[str]] = defaultdict(set)
    unreadable = []
    for where, value in _arguments(trees, "code"):
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            codes[value.value].add(where)
        elif isinstance(value, ast.Constant) and value.value is None:
            continue  # "no code given": the class's own
        elif getattr(value, "id", getattr(value, "attr", None)) != "code":
            unreadable.append(f"{where}: code={ast.unparse(value)}")
    for where, code in _class_and_table_codes(trees):
        codes[code].add(where)
    assert unreadable == [], "codes that cannot be read statically"
    return dict(codes)


def readme_error_table() -> dict[str, set[str]]:
    """The README's error table: status -> codes."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Errors\n", 1)[1].split("\n### ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and re.match(r"\d{3}|any", cells[0]):
            table[cells[0]] = set(re.findall(r"`([a-z_]+)`", cells[1]))
    return table


def openapi_descriptions(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                yield value
            else:
                yield from openapi_descriptions(value)
    elif isinstance(node, list):
        for item in node:
            yield from openapi_descriptions(item)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    settings = settings_for(tmp_path_factory.mktemp("none") / "models")
    document: dict[str, object] = create_app(settings).openapi()
    return document


def test_the_collector_finds_codes_of_every_kind() -> None:
    codes = sent_codes()
    assert "app/registry.py" in " ".join(codes["unknown_model"])  # code="..."
    assert "empty_file" in codes  # ImageRejected(422, "empty_file", ...)
    assert "file_too_large" in codes  # _too_large(..., "file_too_large", ...)
    assert "internal_error" in codes and "unavailable" in codes  # class attributes
    assert "method_not_allowed" in codes  # _STATUS_CODES
    assert "invalid_tensor" not in codes  # /v2 only: sent as a message


def test_the_readme_error_table_lists_every_code_the_service_can_send() -> None:
    codes = sent_codes()
    table = readme_error_table()
    listed = set().union(*table.values())
    missing = {code: sorted(where) for code, where in codes.items() if code not in listed}
    assert missing == {}
    assert listed - set(codes) == set(), "codes in the README that the service never sends"
    statuses = {"400", "401 / 403", "404", "405", "409", "413", "415", "422", "500", "any"}
    assert statuses <= set(table)


def test_the_openapi_document_names_every_code_the_service_can_send(
    spec: dict[str, object],
) -> None:
    named = set()
    for text in openapi_descriptions(spec):
        named |= set(re.findall(r"`([a-z_]+)`", text))
    assert sorted(set(sent_codes()) - named) == []


def test_the_details_of_every_error_are_documented() -> None:
    """Each ``details`` dict the app builds has only keys that ErrorDetails documents."""
    fields = set(ErrorDetails.model_fields)
    undocumented = {}
    for where, value in _arguments(_trees(), "details"):
        if isinstance(value, ast.Dict):
            keys = {k.value for k in value.keys if isinstance(k, ast.Constant)}
            assert len(keys) == len(value.keys), f"{where}: keys that are not literals"
            if keys - fields:
                undocumented[where] = sorted(keys - fields)
    assert undocumented == {}


@pytest.fixture(scope="module")
def client(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    repo = tmp_path_factory.mktemp("errors") / "models"
    link_tree(template_repo, repo)
    with TestClient(create_app(settings_for(repo, admin_token=TOKEN))) as client:
        wait_ready(client)
        yield client


def test_a_405_allows_every_method_of_the_path(client: TestClient) -> None:
    # Starlette named only the first route's methods: 'Allow: PUT' where DELETE works too.
    alias = f"/v1/admin/models/{MODEL}/aliases/qa"
    response = client.request("OPTIONS", alias)
    assert_error(response, 405, "method_not_allowed", "OPTIONS")
    assert response.headers["allow"] == "DELETE, PUT"
    assert client.post("/v1/models").headers["allow"] == "GET, HEAD"
    assert client.get("/v1/predict").headers["allow"] == "POST"


def test_v2_answers_a_malformed_version_400_as_its_document_says(client: TestClient) -> None:
    # The registry's 422 invalid_version went out as a 422, which /v2 never documents.
    for path in (f"/v2/models/{MODEL}/versions/01", f"/v2/models/{MODEL}/versions/01/ready"):
        response = client.get(path)
        assert response.status_code == 400
        assert list(response.json()) == ["error"]
        assert "names no version" in response.json()["error"]
    infer = client.post(f"/v2/models/{MODEL}/versions/1.0/infer", content=json.dumps({}))
    assert infer.status_code == 400 and "names no version" in infer.json()["error"]
    # /v1 keeps its 422 and code.
    assert_error(client.get(f"/v1/models/{MODEL}/versions/01"), 422, "invalid_version")
