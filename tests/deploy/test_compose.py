"""docker-compose.yml: valid Compose, and consistent with the Dockerfile and the settings."""

from __future__ import annotations

import copy
import json
import os
from pathlib import PurePosixPath
from typing import Any

import jsonschema
import pytest
from torch.distributed import run as torchrun

from app.settings import Settings
from tests.deploy.serving import app_routes
from tests.deploy.specs import (
    COMPOSE_SCHEMA,
    REPO,
    compose_variables,
    duration_s,
    healthcheck_command,
    load_compose,
    load_compose_raw,
    load_dockerfile,
    read_env_file,
    service_environment,
    service_mounts,
    split_port,
)
from tests.deploy.test_dockerfile import healthcheck_paths

SCHEMA = json.loads(COMPOSE_SCHEMA.read_text())
RAW = load_compose_raw()
COMPOSE = load_compose()  # interpolated with every variable unset: the defaults
API = COMPOSE["services"]["api"]
TRAIN = COMPOSE["services"]["train"]
DOCKERFILE = load_dockerfile()


def schema_errors(document: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_compose_file_validates_against_the_compose_schema() -> None:
    assert schema_errors(RAW) == []
    assert schema_errors(COMPOSE) == []
    # The schema is strict enough to notice a mistake (not a vacuous check).
    broken = copy.deepcopy(RAW)
    broken["services"]["api"]["restart_policy"] = "always"
    broken["services"]["train"]["deploy"]["resources"]["reservations"]["devices"][0].pop(
        "capabilities"
    )
    assert len(schema_errors(broken)) == 2


def test_services_build_targets_of_the_dockerfile_with_declared_args() -> None:
    assert set(COMPOSE["services"]) == {"api", "train"}
    for name, target in (("api", "serve"), ("train", "train")):
        build = COMPOSE["services"][name]["build"]
        assert build["context"] == "."
        assert build["target"] == target and target in DOCKERFILE.stage_names
        assert set(build.get("args", {})) <= DOCKERFILE.all_arg_names()
        assert build["args"]["TORCH_VARIANT"] == "cuda"


def gpu_reservation(service: dict[str, Any]) -> dict[str, Any]:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    return device


@pytest.mark.parametrize("name", ["api", "train"])
def test_services_reserve_the_gpu(name: str) -> None:
    device = gpu_reservation(COMPOSE["services"][name])
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device.get("count", "all") == "all" or int(device["count"]) >= 1


def api_settings_env() -> dict[str, str]:
    """What the api container sees: the image's ENV, overridden by compose's environment."""
    image = DOCKERFILE.image("serve").env
    env = {k: v for k, v in image.items() if k.startswith("WASTE_")}
    env.update(service_environment(API))
    return env


def test_api_environment_is_made_of_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = service_environment(API)
    unknown = [k for k in env if k.removeprefix("WASTE_").lower() not in Settings.model_fields]
    assert not unknown and all(k.startswith("WASTE_") for k in env), unknown
    for key in list(os.environ):
        if key.startswith("WASTE_"):
            monkeypatch.delenv(key)
    for key, value in api_settings_env().items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.bootstrap_demo is False
    # The published container port is the port the server listens on, and the image's EXPOSE.
    assert [split_port(p)[1] for p in API["ports"]] == [str(settings.port)]
    assert str(settings.port) in DOCKERFILE.image("serve").expose


def test_api_mounts_the_model_repository_read_only_where_the_settings_point() -> None:
    model_dir = api_settings_env()["WASTE_MODEL_DIR"]
    (mount,) = [m for m in service_mounts(API) if m.target == model_dir]
    assert mount.source == "./models" and (REPO / "models").is_dir()
    assert mount.read_only
    # The repository is the only state: nothing else is mounted or persisted.
    assert service_mounts(API) == [mount]


def test_api_healthcheck_is_the_image_healthcheck_on_readiness() -> None:
    check = API["healthcheck"]
    image_check = DOCKERFILE.image("serve").healthcheck
    assert image_check is not None
    assert check["test"] == ["CMD", *healthcheck_command(image_check)]
    (path,) = healthcheck_paths(check["test"][1:])
    assert path == "/health/ready" and (path, "GET") in app_routes()
    assert duration_s(check["start_period"]) >= 60
    assert duration_s(check["timeout"]) < duration_s(check["interval"])


def test_api_restarts_and_drains_before_it_is_killed() -> None:
    assert API["restart"] in ("always", "unless-stopped", "on-failure")
    assert API.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert API.get("init") is True, "tini forwards SIGTERM and reaps uvicorn's workers"
    grace = duration_s(API["stop_grace_period"])
    # Every place the drain time can come from: the service default, the image, the
    # example .env and compose's own environment. Leave at least 10 s to unload.
    candidates = [
        Settings.model_fields["graceful_shutdown_s"].default,
        *(float(v) for k, v in api_settings_env().items() if k == "WASTE_GRACEFUL_SHUTDOWN_S"),
        *(
            float(v)
            for k, v in read_env_file(commented=True).items()
            if k == "WASTE_GRACEFUL_SHUTDOWN_S"
        ),
    ]
    assert grace >= max(candidates) + 10


def test_api_scales_out_to_several_replicas() -> None:
    assert "container_name" not in API, "a fixed container name prevents --scale"
    (spec,) = RAW["services"]["api"]["ports"]
    assert spec == "${API_PORTS:-8000}:8000"
    scaled = load_compose(env={"API_PORTS": "8000-8003"})["services"]["api"]
    host, container = split_port(scaled["ports"][0])
    assert (host, container) == ("8000-8003", "8000")


def test_train_runs_torchrun_under_a_profile() -> None:
    assert TRAIN["profiles"] == ["train"]
    argv = [*TRAIN["entrypoint"], *TRAIN["command"]]
    assert argv[0] == "torchrun"
    args = torchrun.parse_args(argv[1:])
    assert args.standalone and args.module and args.training_script == "training"
    assert args.nproc_per_node == "gpu"  # one process per GPU by default
    assert args.training_script_args[0] == "train"


def test_train_reads_data_and_publishes_into_the_shared_model_repository() -> None:
    from training.cli import build_parser, config_from_args

    argv = [*TRAIN["entrypoint"], *TRAIN["command"]]
    train_argv = torchrun.parse_args(argv[1:]).training_script_args
    config = config_from_args(build_parser().parse_args(train_argv))
    workdir = PurePosixPath(TRAIN["working_dir"])
    mounts = {m.target: m for m in service_mounts(TRAIN)}

    def mount_of(path: Any) -> Any:
        full = workdir / str(path)
        return next(m for t, m in mounts.items() if PurePosixPath(t) in (full, *full.parents))

    assert config.data_dir is not None and config.publish_repo is not None
    data = mount_of(config.data_dir)
    assert data.source == "./data"
    models = mount_of(config.publish_repo)
    assert models.source == "./models" and not models.read_only, "training writes versions"
    # The api serves the same folder that training publishes into.
    assert models.source == next(m.source for m in service_mounts(API))
    # Without --out the run goes to runs/<stamp>, which must outlive the container.
    assert config.out_dir is None and mount_of("runs").source == "./runs"
    assert DOCKERFILE.image("train").env["TORCH_HOME"] in mounts
    assert TRAIN["shm_size"], "DataLoader workers need more than Docker's 64 MB /dev/shm"
    assert TRAIN["user"] == "1000:1000", "files on the host belong to the host user"


def test_variables_of_the_compose_file_are_documented_in_its_header() -> None:
    header = (REPO / "docker-compose.yml").read_text().split("\nname:")[0]
    for name in compose_variables(RAW):
        assert f"#   {name}" in header or f"#   {name}," in header or f", {name}" in header, name
