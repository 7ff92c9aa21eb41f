"""Start-up checks of the model repository, and the demo model when it holds none.

This is the one module of the service that reaches into the training side: when the
repository is empty and WASTE_BOOTSTRAP_DEMO is on, start-up trains and publishes a small
demo model with ``training.demo``. That module is imported lazily, only then, so the
serving install never needs the training extras.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.registry import repository_has_models
from app.settings import Settings

log = logging.getLogger("app")

Bootstrap = Callable[..., Any]  # training.demo.bootstrap_demo(repo, name=..., log=...)


class StartupError(RuntimeError):
    """The service cannot start; the message says what to change."""


def check_repository(settings: Settings) -> Bootstrap | None:
    """Refuse a repository the service cannot serve; return the demo bootstrap it needs.

    None means the repository already holds a model, or is empty with the demo off (the
    service then starts and stays unready).
    """
    repo = settings.model_dir
    if repo.exists() and not repo.is_dir():
        raise StartupError(f"WASTE_MODEL_DIR={str(repo)!r} is not a directory")
    if repository_has_models(repo):
        return None
    if settings.bootstrap_demo:
        bootstrap = demo_bootstrapper(repo)
        repo.mkdir(parents=True, exist_ok=True)
        return bootstrap
    if not repo.is_dir():
        raise StartupError(
            f"WASTE_MODEL_DIR={str(repo)!r} does not exist; create it and publish a "
            "model, or turn on WASTE_BOOTSTRAP_DEMO"
        )
    return None


def demo_bootstrapper(repo: Path) -> Bootstrap:
    """Import the demo bootstrapper lazily: it needs the training extras."""
    try:
        module = importlib.import_module("training.demo")
        bootstrap: Bootstrap = module.bootstrap_demo
        return bootstrap
    except (ImportError, AttributeError) as exc:
        raise StartupError(
            f"the model repository {str(repo)!r} holds no model and WASTE_BOOTSTRAP_DEMO is on, "
            f"but the demo model cannot be built here ({exc}). Install the training extras "
            "(pip install '.[train]'), or publish a model into the repository, or set "
            "WASTE_BOOTSTRAP_DEMO=0."
        ) from exc


def bootstrap_once(bootstrap: Bootstrap, repo: Path, name: str) -> None:
    """Run the demo bootstrap unless another worker process did it meanwhile.

    With WASTE_WORKERS > 1 every worker starts on the same empty repository; a file lock
    makes the first one build the demo and the others wait and then find it.
    """
    import fcntl  # Linux/macOS: where the service runs

    repo.mkdir(parents=True, exist_ok=True)
    with (repo / ".bootstrap.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if repository_has_models(repo):
            log.info("the demo model was published by another worker")
            return
        bootstrap(repo, name=name, log=log.info)
