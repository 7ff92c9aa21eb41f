"""Every command of the README's Docker section matches the Dockerfile and the compose file.

Each shell line of the section's ``bash`` blocks is read and checked against what it
names: build targets, build arguments and their allowed values, image tags, published
ports, mounts, settings, compose services, profiles, variables, scale, health routes and
the training command line. A command this file does not know fails the test, so a new
command in the README needs a check here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from torch.distributed import run as torchrun

from app.settings import Settings, SettingsError, load_settings
from tests.deploy.serving import app_routes
from tests.deploy.specs import (
    README,
    compose_variables,
    docker_section,
    duration_s,
    load_compose,
    load_compose_raw,
    load_dockerfile,
    options,
    port_range,
    read_env_file,
    run_script,
    service_mounts,
    shell_lines,
    split_port,
    words_of,
)

DOCKERFILE = load_dockerfile()
RAW_COMPOSE = load_compose_raw()


@dataclass
class Session:
    """What earlier commands of the section made: image tags and container names."""

    images: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    containers: set[str] = field(default_factory=set)
    copied_env: bool = False
    made_dirs: set[str] = field(default_factory=set)


def torch_variants() -> set[str]:
    script = next(
        run_script(i) for i in DOCKERFILE.stage("deps").of("RUN") if "TORCH_VARIANT" in i.body
    )
    case = script[script.index("case ") : script.index("esac")]
    return set(re.findall(r"(\w+)\)", case))


def check_docker_build(words: list[str], session: Session) -> None:
    opts, rest = options(words, {"-t", "--tag", "--target", "--build-arg", "-f", "--file"})
    assert rest == ["."], f"build from the repository root, got {rest}"
    target = None
    tag = None
    args: dict[str, str] = {}
    for name, value in opts:
        if name in ("-t", "--tag"):
            tag = value
        elif name == "--target":
            target = value
            assert value in DOCKERFILE.stage_names, f"no stage {value!r}"
        elif name == "--build-arg":
            key, _, arg = value.partition("=")
            assert key in DOCKERFILE.all_arg_names(), f"the Dockerfile declares no ARG {key}"
            args[key] = arg
        else:
            raise AssertionError(f"docker build option {name} is not checked here")
    assert tag, "tag the image so that later commands can name it"
    if "TORCH_VARIANT" in args:
        assert args["TORCH_VARIANT"] in torch_variants()
    stage = DOCKERFILE.stage(target).name
    # A tag without a variant suffix is the one compose uses, so `compose up` reuses it.
    if ":" not in tag:
        service = next(s for s in RAW_COMPOSE["services"].values() if s["build"]["target"] == stage)
        assert service["image"] == f"{tag}:latest"
    session.images[tag if ":" in tag else f"{tag}:latest"] = (stage or "", args)


def check_docker_run(words: list[str], session: Session) -> None:
    opts, rest = options(
        words, {"--name", "-p", "--publish", "-v", "--volume", "-e", "--env", "--gpus"}
    )
    (image_ref,) = rest
    tag = image_ref if ":" in image_ref else f"{image_ref}:latest"
    assert tag in session.images, f"{image_ref} is not built by the README"
    stage, build_args = session.images[tag]
    image = DOCKERFILE.image(stage, build_args)
    env = {k: v for k, v in image.env.items() if k.startswith("WASTE_")}
    mounts = []
    gpus = False
    for name, value in opts:
        if name == "--name":
            session.containers.add(value)
        elif name in ("-p", "--publish"):
            _, container = split_port(value)
            assert container in image.expose, f"{container} is not EXPOSEd by {stage}"
        elif name in ("-v", "--volume"):
            mounts.append(value.split(":"))
        elif name in ("-e", "--env"):
            key, _, val = value.partition("=")
            assert key.removeprefix("WASTE_").lower() in Settings.model_fields, key
            env[key] = val
        elif name == "--gpus":
            gpus = True
        elif name not in ("-d", "--detach", "--rm", "--init"):
            raise AssertionError(f"docker run option {name} is not checked here")
    variant = build_args.get("TORCH_VARIANT", "cuda")
    assert gpus == (variant == "cuda"), "--gpus goes with the CUDA image only"
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("WASTE_")}
    try:
        os.environ.update(env)
        settings = load_settings()
    except SettingsError as exc:
        raise AssertionError(f"the container's settings are invalid: {exc}") from None
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)
    (models,) = [m for m in mounts if m[1] == str(settings.model_dir)]
    assert models[0].endswith("/models") and models[2:] == ["ro"], models


def check_docker_stop(words: list[str], session: Session) -> None:
    opts, rest = options(words, {"--time", "-t"})
    assert set(rest) <= session.containers, f"{rest} were not started by the README"
    (time_s,) = [int(v) for k, v in opts if k in ("--time", "-t")]
    graceful = Settings.model_fields["graceful_shutdown_s"].default
    assert time_s >= graceful + 10, "docker stop must wait longer than the graceful shutdown"
    assert time_s == duration_s(RAW_COMPOSE["services"]["api"]["stop_grace_period"])


def check_compose(words: list[str], env: dict[str, str], session: Session) -> None:
    unknown = set(env) - compose_variables(RAW_COMPOSE)
    assert not unknown, f"docker-compose.yml does not read {unknown}"
    compose = load_compose(env=env)
    services = compose["services"]
    profiles = set()
    while words[0].startswith("-"):
        name = words.pop(0)
        assert name == "--profile", f"compose option {name} is not checked here"
        profiles.add(words.pop(0))
    assert profiles <= {p for s in services.values() for p in s.get("profiles", [])}
    command, *args = words
    if command == "up":
        opts, named = options(args, {"--scale"})
        assert set(named) <= set(services)
        for name, value in opts:
            if name == "--scale":
                service, _, count = value.partition("=")
                assert "container_name" not in services[service]
                host_ports = [split_port(p)[0] for p in services[service]["ports"]]
                assert all(len(port_range(h)) >= int(count) for h in host_ports), (
                    f"{count} replicas need {count} host ports: {host_ports}"
                )
            else:
                assert name in ("-d", "--detach", "--build"), name
        assert session.copied_env, "create .env before compose up"
    elif command == "run":
        opts, (service, *extra) = options(args, set())
        assert {n for n, _ in opts} <= {"--rm"}
        assert set(services[service].get("profiles", [])) <= profiles
        if service == "train":
            check_training_command(services["train"], extra, session)
    elif command in ("ps", "restart", "logs", "down"):
        _, named = options(args, set())
        assert set(named) <= set(services)
    else:
        raise AssertionError(f"docker compose {command} is not checked here")


def check_training_command(service: dict[str, Any], extra: list[str], session: Session) -> None:
    from training.cli import build_parser, config_from_args

    argv = [*service["entrypoint"], *(extra or service["command"])]
    train_argv = torchrun.parse_args(argv[1:]).training_script_args
    config = config_from_args(build_parser().parse_args(train_argv))
    workdir = PurePosixPath(service["working_dir"])
    targets = {PurePosixPath(m.target): m for m in service_mounts(service)}
    for path in (config.data_dir, config.publish_repo, PurePosixPath("runs")):
        assert path is not None
        full = workdir / str(path)
        mount = next((m for t, m in targets.items() if t in (full, *full.parents)), None)
        assert mount is not None, f"{path} is not on a mounted folder: it would be lost"
        assert mount.source.removeprefix("./") in session.made_dirs | {"models"}, (
            f"create {mount.source} before the run (compose does not create it)"
        )


def check_curl(words: list[str]) -> None:
    opts, (url,) = options(words, {"-X", "-H"})
    method = dict(opts).get("-X", "GET")
    m = re.fullmatch(r"(?:http://)?localhost:(\d+)(/\S*)", url)
    assert m, url
    assert m.group(1) == split_port(load_compose()["services"]["api"]["ports"][0])[0]
    assert (m.group(2), method) in app_routes(), f"{method} {m.group(2)} is not an app route"
    for name, value in opts:
        if name == "-H" and value.startswith("Authorization"):
            assert value == "Authorization: Bearer $WASTE_ADMIN_TOKEN"


def check_section(section: str) -> list[str]:
    session = Session()
    checked = []
    for line in shell_lines(section):
        env, words = words_of(line)
        if words[:2] == ["docker", "build"]:
            assert not env
            check_docker_build(words[2:], session)
        elif words[:2] == ["docker", "run"]:
            check_docker_run(words[2:], session)
        elif words[:2] == ["docker", "stop"]:
            check_docker_stop(words[2:], session)
        elif words[:2] == ["docker", "compose"]:
            check_compose(words[2:], env, session)
        elif words[0] == "curl":
            check_curl(words[1:])
        elif words == ["cp", ".env.example", ".env"]:
            assert read_env_file(), ".env.example has settings to copy"
            session.copied_env = True
        elif words[:2] == ["mkdir", "-p"]:
            session.made_dirs.update(words[2:])
        else:
            raise AssertionError(f"no check covers this README command: {line}")
        checked.append(line)
    return checked


def test_readme_docker_commands_match_the_dockerfile_and_compose() -> None:
    checked = check_section(docker_section(README.read_text()))
    text = " ".join(checked)
    # The section shows every use: build (GPU and CPU), run (GPU and CPU), compose up,
    # train with compose under its profile, and scaling out.
    for needed in (
        "docker build -t",
        "--build-arg TORCH_VARIANT=cpu",
        "--target train",
        "--gpus all",
        "waste-classifier:cpu",
        "docker compose up",
        "--profile train run",
        "--scale api=",
    ):
        assert needed in text, f"the Docker section lacks a command with {needed!r}"
