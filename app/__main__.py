"""``python -m app``: start the service with uvicorn, configured from ``WASTE_*`` settings.

Host, port, workers, keep-alive and graceful-shutdown timeouts come from the same
settings as the service. On SIGTERM (or Ctrl-C) uvicorn stops accepting connections,
lets in-flight requests finish within WASTE_GRACEFUL_SHUTDOWN_S, runs the app's shutdown
(batchers drain) and exits 0. With several workers the listening socket closes at once
too, so new connections are refused (not reset) with any number of workers.
"""

from __future__ import annotations

import os

# Before torch is imported (libgomp reads it once): idle OpenMP workers sleep instead of
# spinning. On a small CPU shared by the event loop and decode threads, spinning workers
# burn the cycles those threads need (measured with benchmarks/serve_load.py). Set
# OMP_WAIT_POLICY=ACTIVE to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import signal
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from app.settings import Settings, SettingsError, describe_settings, load_settings


def _return_after_shutdown() -> None:
    # uvicorn re-raises the signal that stopped it once its graceful shutdown is complete.
    # With the default handlers the process would then die by SIGTERM (exit 143); these
    # handlers ignore that second delivery so main() returns 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, closing its copy of the listening socket.

    The parent binds the socket and every worker inherits a copy. uvicorn's parent keeps
    its copy open until all workers have exited; after SIGTERM the workers stop accepting,
    but the kernel still completes the handshake of new connections into the backlog,
    where they wait unanswered and are reset when the parent finally exits (clients get
    ConnectionResetError; with one worker they get "connection refused", which they and
    load balancers retry safely). Closing the parent's copy before the workers are told
    to stop makes the socket go away with the workers' own copies, as with one worker.
    """

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def serve(settings: Settings) -> int:
    """Run uvicorn until it is stopped; the exit status of ``python -m app``."""
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        log_level=settings.log_level,
        access_log=settings.access_log,
        loop="auto",
        http="auto",
    )
    _return_after_shutdown()
    if config.workers > 1:
        _Supervisor(config, sockets=[config.bind_socket()]).run()
        return 0
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve the waste classifier over HTTP. Configure it with environment "
        "variables (listed by --help-settings); OpenAPI docs at http://HOST:PORT/docs.",
    )
    parser.add_argument(
        "--help-settings",
        action="store_true",
        help="list every WASTE_* setting with its default and exit",
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the settings and exit (0 = valid)"
    )
    args = parser.parse_args(argv)
    if args.help_settings:
        print(describe_settings())
        return 0
    try:
        settings = load_settings()
        # The device, backend and precision are checked too, so a bad combination fails
        # here, before uvicorn starts workers.
        from app.selection import resolve

        resolve(settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print("settings are valid")
        return 0
    from app.ui import page_url

    # The page answers at once; it shows start-up progress until the models are ready.
    print(f"Browser page: {page_url(settings)}  (API docs: {page_url(settings)}docs)", flush=True)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
