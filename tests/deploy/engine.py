"""A Docker engine, a CLI that builds with BuildKit, and a base image, for the image tests.

The container tests must run on a bare CI machine, so this module gets what they need:

- an engine: the one that answers already (``DOCKER_HOST`` or the default socket) is used
  and left running; otherwise Debian's ``docker.io`` (Engine 20.10) is started as a
  ``dockerd`` of its own, on a private socket and data root, and stopped afterwards. It
  runs with ``--iptables=false``: it leaves the host's firewall alone, so containers on
  its bridge reach no outside network (builds use ``--network host``), while published
  ports still work through Docker's userland proxy;
- a CLI that builds ``RUN --mount`` with BuildKit: a ``docker`` with the buildx plugin,
  else Debian's own CLI (BuildKit built in). A current CLI without buildx refuses BuildKit;
- a base image for ``PYTHON_IMAGE``: ``python:3.11-slim-trixie`` when the engine has it or
  can pull it, else one made from Debian's packages with ``debootstrap`` and
  ``docker import``, with this machine's locally added CA certificates (an intercepting
  proxy's) so that pip inside the build can reach PyPI.

``docker.io`` and ``debootstrap`` are installed with apt-get where they are missing; that
needs root. :func:`why_unavailable` says why none of this can work on a machine (not Linux,
not root, no apt-get), which is the only case in which the tests skip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

Log = Callable[[str], None]

DEBIAN_CLI = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
# Where a dockerd started here keeps its socket and state, and its images and build cache
# (kept between runs: a warm rebuild takes seconds instead of minutes).
STATE_DIR = Path("/run/waste-test-docker")
DATA_ROOT = Path("/var/lib/waste-test-docker")
OFFICIAL_BASE = "python:3.11-slim-trixie"
BASE_REPO = "waste-test/python"
DEBIAN_SUITE = "bookworm"  # Python 3.11, as in python:3.11-slim
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
# PATH and LANG of the official python images; an imported image has no ENV at all.
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
# Trimmed from the debootstrapped tree (155 MB left): documentation and apt's indexes.
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "var/lib/apt/lists", "var/cache/apt")


class EngineError(RuntimeError):
    """The engine could not be installed, started or used (a failure, not a skip)."""


class EngineUnavailable(RuntimeError):
    """No engine runs and none can be installed and started here (a reason to skip)."""


@dataclass
class Engine:
    cli: list[str]  # the docker command, with --host when the engine is private
    server_version: str
    process: subprocess.Popen[bytes] | None = None  # a dockerd started here
    log_path: Path | None = None
    runtimes: set[str] = field(default_factory=set)

    @property
    def major(self) -> int:
        return int(self.server_version.split(".")[0])

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.cli, *args], capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and done.returncode != 0:
            raise EngineError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0


def why_unavailable() -> str | None:
    """Why no engine can be had here, or None. Only asked when none answers already."""
    if sys.platform != "linux":
        return f"Docker engines run on Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return f"installing and starting a Docker engine needs root, this is uid {os.geteuid()}"
    if shutil.which("apt-get") is None and not Path(DOCKERD).exists():
        return "no apt-get to install Debian's docker.io and debootstrap"
    return None


def apt_install(packages: list[str], log: Log) -> None:
    """apt-get install the packages not installed yet (no recommends: no extra daemons)."""
    missing = [p for p in packages if not _dpkg_installed(p)]
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # One unreachable source fails `update` while Debian's own indexes are fine: go on,
    # and show its output only if the install fails too.
    update = subprocess.run(
        ["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=900
    )
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise EngineError(
            f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}{done.stderr}\n"
            f"apt-get update said:\n{update.stdout[-1000:]}{update.stderr}"
        )


def _dpkg_installed(package: str) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return done.returncode == 0 and done.stdout.endswith(" installed")


def _cli_builds_with_buildkit(cli: str) -> bool:
    """A CLI from 23.0 on needs the buildx plugin for BuildKit; older ones talk to it directly."""
    version = subprocess.run(
        [cli, "version", "--format", "{{.Client.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    if not version:
        return False
    if int(version.split(".")[0]) < 23:
        return True
    buildx = subprocess.run([cli, "buildx", "version"], capture_output=True, timeout=30)
    return buildx.returncode == 0


def pick_cli() -> str | None:
    candidates = [c for c in (shutil.which("docker"), DEBIAN_CLI) if c and Path(c).exists()]
    return next((c for c in dict.fromkeys(candidates) if _cli_builds_with_buildkit(c)), None)


def _connect(cli: list[str]) -> Engine | None:
    done = subprocess.run(
        [*cli, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0 or not done.stdout.strip():
        return None
    engine = Engine(cli, done.stdout.strip())
    runtimes = engine.run("info", "--format", "{{range $k, $v := .Runtimes}}{{$k}} {{end}}")
    engine.runtimes = set(runtimes.stdout.split())
    return engine


def _private_cli(cli: str) -> list[str]:
    return [cli, "--host", f"unix://{STATE_DIR / 'docker.sock'}"]


def _start_dockerd(cli: str, log: Log) -> Engine:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = STATE_DIR / "dockerd.log"
    argv = [
        DOCKERD,
        f"--host=unix://{STATE_DIR / 'docker.sock'}",
        f"--data-root={DATA_ROOT}",
        f"--exec-root={STATE_DIR / 'exec'}",
        f"--pidfile={STATE_DIR / 'dockerd.pid'}",
        "--iptables=false",
    ]
    log(" ".join(argv))
    with log_path.open("ab") as out:
        # Its own session: a Ctrl-C reaches pytest, whose teardown then stops the engine.
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineError(f"dockerd exited with {process.returncode}:\n{_tail(log_path)}")
        engine = _connect(_private_cli(cli))
        if engine is not None:
            engine.process, engine.log_path = process, log_path
            return engine
        time.sleep(1)
    _stop(process)
    raise EngineError(f"dockerd did not answer within 90 s:\n{_tail(log_path)}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _leftover_dockerd() -> int | None:
    """PID of a dockerd this module started in an earlier, interrupted run."""
    pidfile = STATE_DIR / "dockerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "dockerd" else None


def _running_engine(log: Log) -> Engine | None:
    cli = pick_cli()
    engine = _connect([cli]) if cli else None
    if engine is not None:
        log(f"using the running Docker Engine {engine.server_version} ({cli})")
    return engine


@contextmanager
def docker_engine(log: Log) -> Iterator[Engine]:
    """An engine for the session; a dockerd started here is stopped on exit.

    Raises EngineUnavailable where none runs and none can be started.
    """
    engine = _running_engine(log)
    if engine is None:
        reason = why_unavailable()
        if reason is not None:
            raise EngineUnavailable(reason)
        if pick_cli() is None or not Path(DOCKERD).exists():
            apt_install(["docker.io"], log)
            engine = _running_engine(log)  # an engine whose CLI was missing, or apt's own
    if engine is not None:
        yield engine
        return
    cli = pick_cli()
    if cli is None:
        raise EngineError("docker.io is installed but no docker CLI builds with BuildKit")
    leftover = _leftover_dockerd()
    if leftover is not None:
        log(f"stopping dockerd {leftover}, left running by an interrupted earlier run")
        os.kill(leftover, signal.SIGTERM)
        _wait_gone(leftover, 60)
    engine = _start_dockerd(cli, log)
    assert engine.process is not None
    log(f"started Docker Engine {engine.server_version} (dockerd pid {engine.process.pid})")
    try:
        yield engine
    finally:
        _stop(engine.process)
        log(f"stopped dockerd (exit {engine.process.returncode})")


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.5)


# -- the base image -------------------------------------------------------------------------
def local_ca_files() -> list[Path]:
    """CA certificates added to this machine (what update-ca-certificates installs)."""
    return sorted(LOCAL_CA_DIR.rglob("*.crt")) if LOCAL_CA_DIR.is_dir() else []


def base_image_tag() -> str:
    """The debootstrap image's tag: changes with the recipe and with the local CAs."""
    digest = hashlib.sha256()
    digest.update(repr((DEBIAN_SUITE, BASE_PACKAGES, BASE_CHANGES, TRIM)).encode())
    for path in local_ca_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{BASE_REPO}:3.11-slim-{DEBIAN_SUITE}-{digest.hexdigest()[:12]}"


def base_image(engine: Engine, workdir: Path, log: Log) -> str:
    """An image for PYTHON_IMAGE: the official one when at hand, else a debootstrapped one."""
    if engine.has_image(OFFICIAL_BASE):
        return OFFICIAL_BASE
    tag = base_image_tag()
    if engine.has_image(tag):
        log(f"base image {tag} (built earlier)")
        return tag
    pull = engine.run("pull", OFFICIAL_BASE, check=False, timeout=600)
    if pull.returncode == 0:
        log(f"pulled {OFFICIAL_BASE}")
        return OFFICIAL_BASE
    log(f"cannot pull {OFFICIAL_BASE} ({pull.stderr.strip()[:200]}); building {tag}")
    if os.geteuid() != 0:
        raise EngineError("building a base image with debootstrap needs root")
    apt_install(["debootstrap"], log)
    started = time.monotonic()
    _debootstrap_import(engine, workdir / "rootfs", tag)
    log(f"built {tag} with debootstrap in {time.monotonic() - started:.0f} s")
    return tag


def _debootstrap_import(engine: Engine, root: Path, tag: str) -> None:
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        DEBIAN_SUITE,
        str(root),
        DEBIAN_MIRROR,
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise EngineError(f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}{done.stderr}")
        ca_dir = root / LOCAL_CA_DIR.relative_to("/")
        ca_dir.mkdir(parents=True, exist_ok=True)
        for path in local_ca_files():
            target = ca_dir / path.relative_to(LOCAL_CA_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        subprocess.run(
            ["chroot", str(root), "update-ca-certificates"], check=True, capture_output=True
        )
        for rel in TRIM:
            for child in (root / rel).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE
        )
        assert tar.stdout is not None
        engine.run("import", *changes, "-", tag, stdin=tar.stdout, timeout=600)
        if tar.wait() != 0:
            raise EngineError(f"tar of {root} failed with {tar.returncode}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
