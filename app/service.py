"""The service's parts, built from one Settings and held together for the routes.

- :class:`~app.lifecycle.Lifecycle`: start-up (repository checks, demo bootstrap, scan),
  polling, shutdown; owns the executors and the model registry.
- :class:`~app.health.Health`: readiness of the service or of one model.
- :class:`~app.catalog.Catalog`: models, versions, aliases and model.json.
- :class:`~app.admin.Admin`: the admin token, rescans, loading and aliases.
- :class:`~app.prediction.Predictor`: uploads in, one answer per file out.
- :class:`~app.explain.Explainer`: uploads in, Grad-CAM and attention maps out, on its
  own bounded executor.
- :class:`~app.v2.service.OpenInference`: the Open Inference Protocol (``/v2``), whose
  tensors go through :class:`~app.tensor_prediction.TensorPredictor` to the same batchers.

Every use case returns a response model of :mod:`app.schemas` or raises a
:class:`~app.errors.ServiceError`; the routes only parse parameters and call one of them.
"""

from __future__ import annotations

from starlette.requests import Request

from app.admin import Admin
from app.catalog import Catalog
from app.errors import Unavailable
from app.explain import Explainer
from app.health import Health
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.prediction import Predictor
from app.settings import Settings
from app.tensor_prediction import TensorPredictor
from app.v2.service import OpenInference


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.lifecycle = Lifecycle(settings, self.metrics)
        self.metrics.install_state_collector(lambda: self.lifecycle.registry)
        self.health = Health(self.lifecycle)
        self.catalog = Catalog(self.lifecycle)
        self.admin = Admin(self.lifecycle)
        self.predictor = Predictor(self.lifecycle, self.metrics)
        memory = self.predictor.upload_memory  # one bound on the bodies of every route
        self.explainer = Explainer(self.lifecycle, self.metrics, memory)
        self.open_inference = OpenInference(
            self.lifecycle,
            self.metrics,
            self.health,
            TensorPredictor(self.lifecycle, self.metrics),
            memory,
        )

    async def start(self) -> None:
        await self.lifecycle.start()

    async def stop(self) -> None:
        await self.lifecycle.stop()
        self.explainer.close()


async def service_from(request: Request) -> Service:
    """The routes' dependency. ``async`` on purpose: FastAPI runs a plain ``def``
    dependency in its thread pool, one thread hop per request for a dictionary lookup."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("the service is not initialised", code="not_ready")
    assert isinstance(service, Service)
    return service
