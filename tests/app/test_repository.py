"""Whatever lies in the model repository, the service keeps serving what is valid.

Junk of every kind is made for real on disk: files where folders are expected, badly named
folders (``²`` once made every poll, every rescan and every restart fail), symbolic links to
nothing and in a loop, and folders that cannot be read.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.registry import RepositoryUnreadable, repository_has_models
from app.repository import Ignored, list_repository
from tests.app.conftest import MODEL, OTHER, TOKEN, add_version, files, image_bytes, wait_until
from tests.app.test_api import assert_error
from tests.app.test_versions import MakeClient, predict_version, states

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
VERSION_NAMES = (
    "not a version: a version folder is named by 1-9 ASCII digits without a leading zero"
)


def make_junk(repo: Path) -> dict[str, str]:
    """Junk of every kind around valid versions; what the listing must say about each."""
    (repo / MODEL / "²").mkdir()
    (repo / MODEL / "01").mkdir()
    (repo / MODEL / "١").mkdir()
    (repo / MODEL / "1234567890").mkdir()
    (repo / MODEL / "7").write_text("a file named like a version")
    (repo / MODEL / "8").symlink_to(repo / "nowhere")
    (repo / MODEL / "9").symlink_to(repo / MODEL / "9")  # a loop
    (repo / MODEL / "notes.txt").write_text("")
    (repo / "Bad Name").mkdir()
    (repo / "stray.bin").write_bytes(b"\0")
    (repo / "gone").symlink_to(repo / "nowhere")
    (repo / "only-junk").mkdir()
    (repo / "only-junk" / "draft").mkdir()
    # Not junk: hidden entries (publishing's temp folders), README files, a folder that
    # will hold a model, and a version that is a link to a version folder.
    (repo / ".bootstrap.lock").write_text("")
    (repo / MODEL / ".tmp-publishing").mkdir()
    (repo / "README.md").write_text("the model repository")
    (repo / "empty-model").mkdir()
    (repo / OTHER / "2").symlink_to(repo / OTHER / "1")
    return {
        "Bad Name": "not a valid model name: use 1-64 characters a-z 0-9 . _ -, starting with "
        "a letter or digit",
        "gone": "a symbolic link to nothing (or a loop)",
        "only-junk/draft": VERSION_NAMES,
        "stray.bin": "a file where a model folder is expected",
        f"{MODEL}/01": VERSION_NAMES,
        f"{MODEL}/1234567890": VERSION_NAMES,
        f"{MODEL}/7": "a file where a version folder is expected",
        f"{MODEL}/8": "a symbolic link to nothing (or a loop)",
        f"{MODEL}/9": "a symbolic link to nothing (or a loop)",
        f"{MODEL}/notes.txt": "a file where a version folder is expected",
        f"{MODEL}/²": VERSION_NAMES,
        f"{MODEL}/١": VERSION_NAMES,
    }


@pytest.fixture
def deny(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Make a folder unreadable (mode 000). Root reads it anyway, so when the tests run as
    root, listing a mode-000 folder fails as the kernel would fail it for any other user."""
    denied: list[Path] = []
    if os.geteuid() == 0:
        real_listdir = os.listdir

        def listdir(path: str | os.PathLike[str] = ".") -> list[str]:
            if stat.S_IMODE(os.stat(path).st_mode) & 0o444 == 0:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_listdir(path)

        monkeypatch.setattr(os, "listdir", listdir)

    def deny(folder: Path) -> None:
        folder.chmod(0)
        denied.append(folder)

    yield deny
    for folder in reversed(denied):  # parents first: a child needs its parent searchable
        folder.chmod(0o755)


def test_the_listing_names_every_kind_of_junk_and_keeps_every_version(repo: Path) -> None:
    expected = make_junk(repo)
    (repo / "readme-model" / "1").mkdir(parents=True)  # a model, not a README file
    listing = list_repository(repo)
    assert {name: m.versions for name, m in listing.models.items()} == {
        MODEL: [1, 2],
        OTHER: [1, 2],
        "readme-model": [1],
    }
    assert {i.path: i.reason for i in listing.ignored} == expected
    assert listing.error is None and listing.unreadable == set()


def test_a_folder_that_cannot_be_read_is_reported_not_taken_as_empty(
    repo: Path, deny: Callable[[Path], None]
) -> None:
    deny(repo / OTHER)
    listing = list_repository(repo)
    assert set(listing.models) == {MODEL} and listing.unreadable == {OTHER}
    assert listing.ignored == [Ignored(OTHER, "cannot be read: Permission denied")]
    deny(repo)
    listing = list_repository(repo)
    assert listing.error == "the model repository cannot be read: Permission denied"
    assert listing.models == {}


def test_junk_never_stops_start_up_and_is_shown_and_logged_once(
    repo: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    expected = make_junk(repo)
    with caplog.at_level(logging.WARNING, logger="app.registry"):
        client = make_client(admin_token=TOKEN, poll_interval_s=0.05)
        body = client.get("/v1/models").json()
        assert {i["path"]: i["reason"] for i in body["ignored"]} == expected
        assert {m["name"] for m in body["models"]} == {MODEL, OTHER}
        assert states(client) == {1: "available", 2: "ready"}
        assert states(client, OTHER) == {1: "available", 2: "ready"}  # 2 is a link to 1
        rescan = client.post("/v1/admin/rescan", headers=ADMIN)
        assert rescan.status_code == 200, rescan.text
        assert {i["path"] for i in rescan.json()["ignored"]} == set(expected)
        time.sleep(0.3)  # several polls: each sees the same junk, none logs it again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    ignoring = [w for w in warnings if w.startswith("model repository: ignoring ")]
    assert sorted(ignoring) == sorted(
        f"model repository: ignoring {path}: {reason}" for path, reason in expected.items()
    )


def test_a_stray_folder_added_while_running_does_not_stop_polling(
    repo: Path, make_client: MakeClient
) -> None:
    client = make_client(admin_token=TOKEN, poll_interval_s=0.05)
    (repo / MODEL / "²").mkdir()
    add_version(repo, MODEL, repo / MODEL / "1")
    wait_until(lambda: states(client).get(3) == "ready", what="v3 picked up by polling")
    assert predict_version(client).json()["version"] == 3  # type: ignore[attr-defined]
    assert client.post("/v1/admin/rescan", headers=ADMIN).status_code == 200
    ignored = client.get("/v1/models").json()["ignored"]
    assert ignored == [{"path": f"{MODEL}/²", "reason": VERSION_NAMES}]


def test_an_unreadable_folder_keeps_serving_what_was_loaded_from_it(
    repo: Path, make_client: MakeClient, deny: Callable[[Path], None]
) -> None:
    client = make_client(admin_token=TOKEN)
    deny(repo / MODEL)
    report = client.post("/v1/admin/rescan", headers=ADMIN).json()
    assert report["removed"] == [] and report["unloaded"] == []
    assert report["ignored"] == [{"path": MODEL, "reason": "cannot be read: Permission denied"}]
    assert states(client) == {1: "available", 2: "ready"}
    assert client.post("/v1/predict", files=files(("a", image_bytes()))).json()["version"] == 2
    deny(repo)
    report = client.post("/v1/admin/rescan", headers=ADMIN).json()
    assert report["removed"] == [] and report["unloaded"] == []
    [entry] = report["ignored"]
    assert entry["path"] == "." and "cannot be read: Permission denied" in entry["reason"]
    assert client.get("/health/ready").json()["models"] == {MODEL: 2, OTHER: 1}


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches any folder")
def test_a_folder_that_can_be_listed_but_not_searched_is_unreadable(repo: Path) -> None:
    (repo / OTHER).chmod(0o444)  # names readable, entries cannot be looked at
    try:
        listing = list_repository(repo)
    finally:
        (repo / OTHER).chmod(0o755)
    assert set(listing.models) == {MODEL} and listing.unreadable == {OTHER}
    assert listing.ignored == [Ignored(OTHER, "cannot be read: Permission denied")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 folder's files")
def test_an_unreadable_version_folder_fails_with_its_reason(
    repo: Path, make_client: MakeClient
) -> None:
    (repo / MODEL / "2").chmod(0)
    try:
        client = make_client()
        version = client.get(f"/v1/models/{MODEL}/versions/2").json()
        assert version["state"] == "failed" and "Permission denied" in version["error"]
        assert predict_version(client).json()["version"] == 1  # type: ignore[attr-defined]
    finally:
        (repo / MODEL / "2").chmod(0o755)


def test_a_version_with_a_non_ascii_name_is_never_served(
    repo: Path, make_client: MakeClient
) -> None:
    # '١' is Arabic-Indic one: int('١') == 1, so it could pass for version 1.
    (repo / MODEL / "1").rename(repo / MODEL / "١")
    client = make_client()
    assert states(client) == {2: "ready"}
    assert_error(client.get(f"/v1/models/{MODEL}/versions/1"), 404, "unknown_version")


def test_start_up_refuses_a_repository_it_cannot_list(
    repo: Path, deny: Callable[[Path], None]
) -> None:
    deny(repo)  # not an empty repository to bootstrap a demo model into
    with pytest.raises(RepositoryUnreadable, match="cannot be read: Permission denied"):
        repository_has_models(repo)
