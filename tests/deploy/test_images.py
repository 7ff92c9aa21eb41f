"""Both images built with the project's Dockerfile and run the way the README runs them.

Not part of the default test run (marker ``docker``); the README names the command. On a
machine without an engine it installs and starts one (see ``engine.py``: root and apt),
so a bare CI machine runs it. It skips, saying why, only where no engine can be had.

The flow: build a base image, the service image and the training image; publish a model
on the host as the README's training section does; run the service image with the
README's ``docker run`` line (model repository mounted read-only, UID 10001); wait for
``/health/ready``, predict, check that every published version loaded; run the training
image as the compose file's ``train`` service does for one short epoch that publishes
the next version; see the running service pick it up; ``docker stop`` it as the README
does and expect exit 0 within the grace period.

What the README's lines cannot say on a test machine is changed, and printed: the image
tags (``:test``, so a user's own images are never replaced), the host port (a free
loopback one), ``--gpus``/the GPU reservation (dropped where the engine has no NVIDIA
runtime), ``$PWD`` (a temporary folder), the container names, and
``WASTE_POLL_INTERVAL_S=1`` so that the service sees the new version within a second.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy import engine as engine_module
from tests.deploy.engine import Engine, EngineUnavailable, base_image, docker_engine
from tests.deploy.serving import DEFAULT_MODEL, free_port, png_bytes
from tests.deploy.specs import (
    README,
    REPO,
    docker_section,
    load_compose,
    options,
    service_mounts,
    shell_lines,
    words_of,
)

SERVE_TAG = "waste-classifier:test"
TRAIN_TAG = "waste-classifier-train:test"
# One short epoch at 32 px from random weights: a real version, published in seconds.
TRAIN_FLAGS = [
    "--publish-name", DEFAULT_MODEL, "--no-pretrained", "--strategy", "differential",
    "--epochs", "1", "--input-size", "32", "--resize-size", "36", "--batch-size", "16",
    "--num-workers", "0", "--no-progress", "--no-plots", "--seed", "0",
]  # fmt: skip
RUN_OPTIONS_WITH_VALUE = {"--name", "-p", "--publish", "-v", "--volume", "-e", "--env", "--gpus"}


def say(message: str) -> None:
    print(f"[images] {message}", flush=True)


@dataclass
class Built:
    engine: Engine
    serve_s: float
    train_s: float


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    try:
        with docker_engine(say) as found:
            yield found
    except EngineUnavailable as exc:
        pytest.skip(f"no Docker engine can be had here: {exc}")


def dockerfile_for(engine: Engine, workdir: Path) -> Path:
    """The Dockerfile, or a copy that an engine older than 25 can parse."""
    dockerfile = REPO / "Dockerfile"
    if engine.major >= 25:
        return dockerfile
    text, count = re.subn(r" --start-interval=\S+", "", dockerfile.read_text())
    assert count == 1, "expected one HEALTHCHECK --start-interval to rewrite"
    copy = workdir / "Dockerfile"
    copy.write_text(text)
    say(
        f"Engine {engine.server_version} cannot parse HEALTHCHECK --start-interval (25+): "
        f"building from a copy without it ({copy}); health checks then begin after the "
        "30 s interval instead of every 5 s during the start period"
    )
    return copy


def build(engine: Engine, dockerfile: Path, base: str, tag: str, target: str, log: Path) -> float:
    argv = [
        "build", "--progress=plain", "--network", "host", "-f", str(dockerfile),
        "--build-arg", f"PYTHON_IMAGE={base}", "--target", target, "-t", tag, str(REPO),
    ]  # fmt: skip
    say(f"docker {' '.join(argv)}")
    previous = image_id(engine, tag)
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(
            [*engine.cli, *argv],
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1800,
        )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        pytest.fail(f"building {tag} failed:\n{log.read_text()[-5000:]}")
    say(f"built {tag} in {seconds:.0f} s")
    if previous and previous != image_id(engine, tag):
        # The image this tag named before (an earlier run's), unless it is still in use.
        engine.run("image", "rm", previous, check=False)
    return seconds


def image_id(engine: Engine, ref: str) -> str:
    return engine.run("image", "inspect", "--format", "{{.Id}}", ref, check=False).stdout.strip()


@pytest.fixture(scope="module")
def built(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Built:
    workdir = tmp_path_factory.mktemp("images")
    base = base_image(engine, workdir, say)
    dockerfile = dockerfile_for(engine, workdir)
    serve_s = build(engine, dockerfile, base, SERVE_TAG, "serve", workdir / "serve.log")
    train_s = build(engine, dockerfile, base, TRAIN_TAG, "train", workdir / "train.log")
    return Built(engine, serve_s, train_s)


def host_python(*args: str, cwd: Path) -> None:
    """``python -m training ...`` on the host, with the usual umask of 022."""
    done = subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        umask=0o022,
    )
    assert done.returncode == 0, f"python -m training {args[0]}:\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the README's commands run: ./models holds one version published on the host."""
    here = tmp_path_factory.mktemp("readme")
    started = time.monotonic()
    host_python("synth", "--out", "data", "--images-per-class", "6", "--size", "48", cwd=here)
    # Another seed than the container's run: the same recipe, data and seed give
    # bit-identical weights, which publishing refuses as a duplicate of v1.
    host_python(
        "train", "--data", "data", "--out-dir", "runs/host", "--publish", "models",
        *TRAIN_FLAGS, "--seed", "1", cwd=here,
    )  # fmt: skip
    say(f"published {DEFAULT_MODEL} v1 on the host in {time.monotonic() - started:.0f} s")
    return here


def readme_docker_lines(command: str) -> list[list[str]]:
    """Words of the README's Docker-section lines that start with ``docker <command>``."""
    lines = [words_of(line)[1] for line in shell_lines(docker_section(README.read_text()))]
    return [words[2:] for words in lines if words[:2] == ["docker", command]]


def service_run_args(engine: Engine, workdir: Path, port: int, name: str) -> list[str]:
    """The README's GPU ``docker run`` line, adapted to this machine as the module says."""
    opts, (image,) = options(readme_docker_lines("run")[0], RUN_OPTIONS_WITH_VALUE)
    assert image == SERVE_TAG.split(":")[0]
    args: list[str] = []
    for key, value in opts:
        if key == "--name":
            args += [key, name]
        elif key in ("-p", "--publish"):
            args += [key, f"127.0.0.1:{port}:{value.rsplit(':', 1)[1]}"]
        elif key in ("-v", "--volume"):
            args += [key, value.replace("$PWD", str(workdir))]
        elif key == "--gpus":
            if "nvidia" in engine.runtimes:
                args += [key, value]
            else:
                say(f"dropped {key} {value}: the engine has no NVIDIA runtime")
        else:
            args += [key, value] if value else [key]
    return ["run", *args, "-e", "WASTE_POLL_INTERVAL_S=1", SERVE_TAG]


def train_run_args(engine: Engine, workdir: Path, name: str) -> list[str]:
    """``docker run`` of the compose file's ``train`` service (compose v2 may be missing)."""
    env = {"TRAIN_NPROC": "1", "HOST_UID": str(os.getuid()), "HOST_GID": str(os.getgid())}
    env["TORCH_HOME"] = str(workdir / "torch")
    service = load_compose(env=env)["services"]["train"]
    args = ["--name", name, "--user", service["user"], "--workdir", service["working_dir"]]
    args += ["--shm-size", service["shm_size"]]
    for mount in service_mounts(service):
        source = Path(mount.source) if mount.source.startswith("/") else workdir / mount.source
        source.mkdir(parents=True, exist_ok=True)
        args += ["-v", f"{source}:{mount.target}{':ro' if mount.read_only else ''}"]
    if "nvidia" in engine.runtimes:
        args += ["--gpus", "all"]
    else:
        say("dropped the train service's GPU reservation: the engine has no NVIDIA runtime")
    executable, *entrypoint = service["entrypoint"]
    flags = [*service["command"], *TRAIN_FLAGS]
    return ["run", *args, "--entrypoint", executable, TRAIN_TAG, *entrypoint, *flags]


def wait_for(what: str, check: Callable[[], Any], timeout: float, why: Callable[[], str]) -> float:
    """Call ``check`` until it returns something true; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout} s\n{why()}")


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def published_versions(workdir: Path) -> list[int]:
    folder = workdir / "models" / DEFAULT_MODEL
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isascii() and p.name.isdigit())


def versions(base_url: str) -> list[dict[str, Any]]:
    models = httpx.get(f"{base_url}/v1/models", timeout=10).json()["models"]
    (model,) = [m for m in models if m["name"] == DEFAULT_MODEL]
    found: list[dict[str, Any]] = model["versions"]
    return found


def versions_state(base_url: str) -> dict[int, str]:
    return {v["version"]: v["state"] for v in versions(base_url)}


def ready_or_fail(engine: Engine, api: str, base_url: str, logs: Callable[[], str]) -> bool:
    """Whether /health/ready answers 200; fails at once on a failed version or an exit."""
    if answers(f"{base_url}/health/ready"):
        return True
    state = engine.run("inspect", "--format", "{{.State.Status}}", api).stdout.strip()
    if state != "running":
        pytest.fail(f"the service container is {state}:\n{logs()}")
    try:
        failed = {v["version"]: v["error"] for v in versions(base_url) if v["state"] == "failed"}
    except (httpx.TransportError, ValueError, KeyError):
        return False  # not answering yet
    if failed:
        pytest.fail(f"versions failed to load in the container: {failed}\n{logs()}")
    return False


def predict(base_url: str, path: str = "/v1/predict") -> dict[str, Any]:
    files = [("files", ("can.png", png_bytes(), "image/png"))]
    response = httpx.post(f"{base_url}{path}", files=files, timeout=60)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["predictions"][0]["status"] == "ok"
    return body


@pytest.mark.docker
@pytest.mark.timeout(2400)
def test_readme_flow_in_real_containers(built: Built, workdir: Path) -> None:
    engine = built.engine
    port, suffix = free_port(), f"test-{os.getpid()}"
    api, trainer = f"waste-api-{suffix}", f"waste-train-{suffix}"
    base_url = f"http://127.0.0.1:{port}"

    def logs() -> str:
        done = engine.run("logs", "--tail", "60", api, check=False)
        return done.stdout + done.stderr

    try:
        run = service_run_args(engine, workdir, port, api)
        say(f"docker {' '.join(run)}")
        started = time.monotonic()
        engine.run(*run)
        ready_s = wait_for(
            "/health/ready", lambda: ready_or_fail(engine, api, base_url, logs), 180, logs
        )
        say(f"ready {ready_s:.1f} s after docker run")
        assert engine.run("exec", api, "id", "-u").stdout.strip() == "10001"
        assert published_versions(workdir) == [1]
        assert versions_state(base_url) == {1: "ready"}
        answer = predict(base_url)
        assert (answer["model"], answer["version"]) == (DEFAULT_MODEL, 1)

        train = train_run_args(engine, workdir, trainer)
        say(f"docker {' '.join(train)}")
        trained = time.monotonic()
        done = engine.run(*train, check=False, timeout=900)
        assert done.returncode == 0, f"training container:\n{done.stdout[-3000:]}{done.stderr}"
        say(f"training container published v2 in {time.monotonic() - trained:.0f} s")
        assert published_versions(workdir) == [1, 2]
        picked_s = wait_for(
            "v2 ready", lambda: versions_state(base_url).get(2) == "ready", 60, logs
        )
        say(f"the service picked v2 up {picked_s:.1f} s later")
        states = versions_state(base_url)
        assert set(states) == {1, 2} and "failed" not in states.values(), states
        assert predict(base_url)["version"] == 2
        assert predict(base_url, f"/v1/models/{DEFAULT_MODEL}/versions/2/predict")["version"] == 2
        check_health_and_stop(engine, api, started, logs)
    finally:
        engine.run("rm", "--force", api, trainer, check=False)
    say(f"builds: serve {built.serve_s:.0f} s, train {built.train_s:.0f} s")


def check_health_and_stop(
    engine: Engine, api: str, started: float, logs: Callable[[], str]
) -> None:
    """Docker's own health check turns healthy; ``docker stop`` as the README: exit 0."""

    def health() -> str:
        return engine.run("inspect", "--format", "{{.State.Health.Status}}", api).stdout.strip()

    # Without --start-interval the first check runs one interval (30 s) after the start.
    wait_for(
        "healthy", lambda: health() == "healthy", max(5, 75 - (time.monotonic() - started)), logs
    )
    (stop_words,) = readme_docker_lines("stop")
    opts, _ = options(stop_words, {"--time", "-t"})
    grace = int(dict(opts).get("--time") or dict(opts)["-t"])
    stopping = time.monotonic()
    engine.run("stop", "--time", str(grace), api, timeout=grace + 30)
    stop_s = time.monotonic() - stopping
    exit_code = engine.run("inspect", "--format", "{{.State.ExitCode}}", api).stdout.strip()
    assert exit_code == "0", f"exit {exit_code} after docker stop:\n{logs()}"
    assert stop_s < grace, f"docker stop took {stop_s:.1f} s: it had to kill"
    say(f"docker stop: exit 0 after {stop_s:.1f} s")


# -- without an engine: what the flow above will run ------------------------------------------
def fake_engine(version: str = "20.10.24+dfsg1", runtimes: set[str] | None = None) -> Engine:
    return Engine(["docker"], version, runtimes=runtimes or {"runc"})


def test_service_run_is_the_readme_line_on_a_free_loopback_port(tmp_path: Path) -> None:
    args = service_run_args(fake_engine(), tmp_path, 40123, "waste-api-test-1")
    assert args == [
        "run", "-d", "--name", "waste-api-test-1", "-p", "127.0.0.1:40123:8000",
        "-v", f"{tmp_path}/models:/models:ro", "-e", "WASTE_POLL_INTERVAL_S=1", SERVE_TAG,
    ]  # fmt: skip
    with_gpu = service_run_args(fake_engine(runtimes={"runc", "nvidia"}), tmp_path, 1, "a")
    assert with_gpu[with_gpu.index("--gpus") + 1] == "all"


def test_train_run_is_the_compose_service(tmp_path: Path) -> None:
    args = train_run_args(fake_engine(), tmp_path, "waste-train-test-1")
    user = f"{os.getuid()}:{os.getgid()}"
    assert args[: args.index("--entrypoint")] == [
        "run", "--name", "waste-train-test-1", "--user", user, "--workdir", "/workspace",
        "--shm-size", "8gb",
        "-v", f"{tmp_path}/models:/workspace/models",
        "-v", f"{tmp_path}/data:/workspace/data:ro",
        "-v", f"{tmp_path}/runs:/workspace/runs",
        "-v", f"{tmp_path}/torch:/torch:ro",
    ]  # fmt: skip
    rest = args[args.index("--entrypoint") + 1 :]
    assert rest[:8] == [
        "torchrun", TRAIN_TAG, "--standalone", "--nproc-per-node=1", "-m", "training", "train",
        "--data",
    ]  # fmt: skip
    assert rest[8:11] == ["data", "--publish", "models"]
    assert rest[11:] == TRAIN_FLAGS
    assert "--gpus" in train_run_args(fake_engine(runtimes={"nvidia"}), tmp_path, "t")


def test_old_engines_get_a_copy_without_start_interval(tmp_path: Path) -> None:
    assert dockerfile_for(fake_engine("25.0.3"), tmp_path) == REPO / "Dockerfile"
    copy = dockerfile_for(fake_engine("20.10.24+dfsg1"), tmp_path)
    original = (REPO / "Dockerfile").read_text().splitlines()
    changed = [
        (a, b) for a, b in zip(original, copy.read_text().splitlines(), strict=True) if a != b
    ]
    ((before, after),) = changed
    assert before.startswith("HEALTHCHECK ") and after == before.replace(" --start-interval=5s", "")


@pytest.mark.parametrize(
    ("platform", "uid", "apt", "reason"),
    [
        ("darwin", 0, True, "Docker engines run on Linux, this is darwin"),
        ("linux", 1000, True, "needs root, this is uid 1000"),
        ("linux", 0, False, "no apt-get to install Debian's docker.io and debootstrap"),
        ("linux", 0, True, None),
    ],
)
def test_skips_only_where_no_engine_can_be_had(
    monkeypatch: pytest.MonkeyPatch, platform: str, uid: int, apt: bool, reason: str | None
) -> None:
    monkeypatch.setattr(engine_module.sys, "platform", platform)
    monkeypatch.setattr(engine_module.os, "geteuid", lambda: uid)
    monkeypatch.setattr(engine_module.shutil, "which", lambda name: "/x" if apt else None)
    monkeypatch.setattr(engine_module, "DOCKERD", "/nonexistent/dockerd")
    found = engine_module.why_unavailable()
    assert found == reason if reason is None else (found is not None and reason in found)
