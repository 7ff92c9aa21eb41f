"""The serving image's build and entry command, executed outside a container.

The fixture builds the ``serve`` target's filesystem in a temporary folder by executing
the Dockerfile itself: a fresh virtualenv where the image has ``/opt/venv`` (the base
stage's ``python -m venv``), then every instruction of the ``deps`` and ``serve`` stages in
order: ``ARG`` defaults, ``ENV``, ``WORKDIR``, ``COPY`` from the build context as
``.dockerignore`` filters it, and each ``RUN`` script verbatim with ``/bin/sh -c``. The test
then starts the image's ``CMD`` with the image's ``ENV`` (host and port moved to a free
loopback port, the model repository where the container would mount it) and waits for
``/health/ready``.

Container paths map to temporary folders; pip finds packages the way this machine's pip
is configured (``PIP_*`` variables and pip.conf stand in for the build's network). One
difference, for speed: ``PIP_COMPILE=0`` skips byte-compiling the 5.5 GB of installed
packages (about a third of the install time here). Python compiles what it imports anyway,
so an import error still surfaces; the image keeps pip's default and ships .pyc files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
import pytest

from tests.deploy.serving import DEFAULT_MODEL, free_port, png_bytes, stop, wait_ready
from tests.deploy.specs import (
    REPO,
    DockerIgnore,
    Image,
    copy_sources,
    healthcheck_command,
    load_dockerfile,
    parse_arg,
    parse_env,
    run_script,
    substitute,
)

# Variables that tell pip and Python where packages come from on this machine.
PASS_THROUGH = (
    "HOME",
    "LANG",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)


@dataclass
class BuiltImage:
    image: Image
    paths: dict[str, Path]  # container path -> folder standing in for it
    install_s: float  # seconds the dependency layer took
    log: Path

    def host(self, container_path: str) -> Path:
        path = PurePosixPath(container_path)
        for prefix in sorted(self.paths, key=len, reverse=True):
            if path == PurePosixPath(prefix) or PurePosixPath(prefix) in path.parents:
                return self.paths[prefix] / path.relative_to(prefix)
        raise AssertionError(f"no stand-in folder for the container path {container_path}")

    def host_env(self, env: dict[str, str]) -> dict[str, str]:
        """Container variables with container paths replaced by their stand-ins."""
        mapped = {}
        for key, value in env.items():
            for prefix in sorted(self.paths, key=len, reverse=True):
                # Whole path components only, also inside PATH-like lists.
                pattern = rf"(?<![^:=\s]){re.escape(prefix)}(?=[/:\s]|$)"
                value = re.sub(pattern, lambda _, p=prefix: str(self.paths[p]), value)
            mapped[key] = value
        return mapped

    @property
    def python(self) -> Path:
        return self.host(self.image.env["VIRTUAL_ENV"]) / "bin" / "python"


def build_context_copy(ignore: DockerIgnore, sources: list[str], dest: Path) -> None:
    """COPY from the build context: a folder's content goes into dest, a file into dest/."""
    for source in sources:
        src = REPO / source
        for rel in ignore.context_files(REPO, source):
            inner = Path(rel).relative_to(source) if src.is_dir() else Path(Path(rel).name)
            target = dest / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, target)


@pytest.fixture(scope="module")
def serve_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage]:
    dockerfile = load_dockerfile()
    image = dockerfile.image("serve")
    root = tmp_path_factory.mktemp("serve-image")
    paths = {
        image.env["VIRTUAL_ENV"]: root / "venv",
        image.workdir: root / "home",
        "/opt/build": root / "build",
        "/models": root / "models",
    }
    for folder in paths.values():
        folder.mkdir(parents=True, exist_ok=True)
    built = BuiltImage(image, paths, 0.0, root / "build.log")
    ignore = DockerIgnore.load()

    base_run = run_script(image.chain[0].of("RUN")[0])
    assert base_run.startswith('python -m venv "$VIRTUAL_ENV"'), base_run
    subprocess.run([sys.executable, "-m", "venv", str(built.python.parents[1])], check=True)

    env = dict(dockerfile.image("base").env)
    workdir = "/"
    host_basics = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    host_basics.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    for stage in image.chain[1:]:
        args: dict[str, str] = {}
        for ins in stage.instructions:
            if ins.keyword == "ARG":
                name, default = parse_arg(ins)
                args[name] = default or ""
            elif ins.keyword == "ENV":
                for key, value in parse_env(ins):
                    env[key] = substitute(value, {**args, **env})
            elif ins.keyword == "WORKDIR":
                workdir = ins.body
                built.host(workdir).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY" and "from" not in ins.flags:
                sources, dest = copy_sources(ins)
                where = PurePosixPath(workdir) / dest
                build_context_copy(ignore, sources, built.host(str(where)))
            elif ins.keyword == "RUN":
                run_env = {**host_basics, **built.host_env({**env, **args}), "PIP_COMPILE": "0"}
                started = time.monotonic()
                with built.log.open("a") as log:
                    log.write(f"\n$ RUN {run_script(ins)}\n")
                    log.flush()
                    done = subprocess.run(
                        ["/bin/sh", "-c", run_script(ins)],
                        cwd=built.host(workdir),
                        env=run_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                if done.returncode != 0:
                    pytest.fail(f"line {ins.line} failed:\n{built.log.read_text()[-4000:]}")
                if stage.name == "deps":
                    built.install_s += time.monotonic() - started
            elif ins.keyword not in ("USER", "EXPOSE", "HEALTHCHECK", "CMD", "LABEL"):
                pytest.fail(f"line {ins.line}: this test cannot replay {ins.keyword} {ins.text}")
    print(f"\ndependency layer installed into a fresh venv in {built.install_s:.0f} s")
    yield built
    # 5.5 GB: too much to leave to pytest's rotation of temporary folders, and deleting it
    # takes from seconds to a minute on a busy disk, so it goes on in the background.
    subprocess.Popen(
        ["rm", "-rf", str(root)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_serving_install_has_no_training_extras_nor_training_code(
    serve_image: BuiltImage,
) -> None:
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "('torch', 'fastapi', 'app', 'wastenet.nets', 'wastenet.artifacts', "
        "'sklearn', 'matplotlib', 'tqdm', 'training')}))"
    )
    done = subprocess.run(
        [str(serve_image.python), "-c", probe],
        cwd=serve_image.host(serve_image.image.workdir),
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(done.stdout)
    assert found == {
        "torch": True,
        "fastapi": True,
        "app": True,
        "wastenet.nets": True,
        "wastenet.artifacts": True,
        "sklearn": False,
        "matplotlib": False,
        "tqdm": False,
        "training": False,
    }


def test_entry_command_answers_readiness_and_classifies(
    serve_image: BuiltImage, tiny_model_repo: Path, tmp_path: Path
) -> None:
    image = serve_image.image
    port = free_port()
    # The container would mount the repository at WASTE_MODEL_DIR; here it is a folder.
    models = serve_image.host(image.env["WASTE_MODEL_DIR"])
    shutil.copytree(tiny_model_repo, models, dirs_exist_ok=True)
    env = serve_image.host_env(image.env)
    env.update(HOME=str(serve_image.host(image.workdir)), LANG="C.UTF-8")
    env.update(WASTE_HOST="127.0.0.1", WASTE_PORT=str(port))
    assert image.cmd is not None
    executable = shutil.which(image.cmd[0], path=env["PATH"])
    assert executable == str(serve_image.python), "the CMD's python is the image's venv"

    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [executable, *image.cmd[1:]],
            cwd=serve_image.host(image.workdir),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        ready_s = wait_ready(base_url, server, log, timeout=180)
        print(f"\nready {ready_s:.1f} s after start")

        # The image's HEALTHCHECK, run as Docker runs it: in the container's environment.
        assert image.healthcheck is not None
        check = healthcheck_command(image.healthcheck)
        check_exe = shutil.which(check[0], path=env["PATH"])
        assert check_exe is not None
        healthy = subprocess.run([check_exe, *check[1:]], env=env, timeout=10)
        assert healthy.returncode == 0
        # ... and it reports unhealthy when nothing answers on the port.
        dead = subprocess.run(
            [check_exe, *check[1:]],
            env={**env, "WASTE_PORT": str(free_port())},
            capture_output=True,
            timeout=10,
        )
        assert dead.returncode == 1

        response = httpx.post(
            f"{base_url}/v1/predict",
            files=[("files", ("can.png", png_bytes(), "image/png"))],
            timeout=30,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["version"]) == (DEFAULT_MODEL, 1)
        assert body["predictions"][0]["status"] == "ok"

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        stop(server)
