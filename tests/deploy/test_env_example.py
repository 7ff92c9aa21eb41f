""".env.example: exactly the service's settings, with values the service accepts."""

from __future__ import annotations

import os

import pytest

from app.settings import ENV_PREFIX, Settings, env_name
from tests.deploy.specs import load_compose, read_env_file, service_environment

ACTIVE = read_env_file()
ALL = read_env_file(commented=True)
API_ENV = service_environment(load_compose()["services"]["api"])


def test_every_variable_is_a_setting() -> None:
    unknown = sorted(
        key
        for key in ALL
        if not key.startswith(ENV_PREFIX)
        or key.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    )
    assert not unknown, f".env.example names variables the service does not read: {unknown}"


def test_every_setting_is_listed() -> None:
    missing = sorted(env_name(f) for f in Settings.model_fields if env_name(f) not in ALL)
    assert not missing, f"add these settings to .env.example (commented out is fine): {missing}"


def test_values_are_accepted_by_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    # Uncommented and commented lines alike: uncommenting any of them must give valid settings.
    for key, value in ALL.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.admin_token is None or len(settings.admin_token) >= 16
    # The commented lines show the defaults, so they cannot mislead.
    for key in ALL:
        if key not in ACTIVE and key not in API_ENV:
            field = key.removeprefix(ENV_PREFIX).lower()
            assert getattr(settings, field) == Settings.model_fields[field].default, key


def test_settings_fixed_by_compose_are_not_offered_as_editable() -> None:
    # compose's `environment:` wins over .env, so an active line would be silently ignored.
    assert set(API_ENV) <= set(ALL)
    assert not set(API_ENV) & set(ACTIVE), sorted(set(API_ENV) & set(ACTIVE))
