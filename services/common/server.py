"""Build, run and stop one gRPC server process around an `Application`.

Every service is an `Application`: it names its gRPC services, registers its servicers,
starts (loading models in the background) and declares itself ready. The host adds what
every service needs: the standard health service (NOT_SERVING until ready), server
reflection, the `CallGuard` interceptor (request ids, metrics, error mapping, load
shedding), TLS, Prometheus metrics, and graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics
from services.common.interceptor import CallGuard
from services.common.logs import configure_logging
from services.common.settings import ServerSettings
from services.common.tracing import Tracing, tracing_for

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("recsys.server")

OVERALL = ""  # the health service's name for "the whole server"


def version_health_name(service: str, version: str) -> str:
    """The health service name saying whether `service` can serve model `version`."""
    return f"{service}@{version}"


class Readiness:
    """What an application uses to say whether it can serve (e.g. a model version is loaded)."""

    def __init__(
        self, service: str, health_servicer: health.aio.HealthServicer, names: Sequence[str]
    ) -> None:
        self._service = service
        self._health = health_servicer
        self._names = (OVERALL, *names)
        self._versions: set[str] = set()  # every version ever published as a health name
        self.serving = False

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._health.set(name, status)
        if serving != self.serving:
            log.info("health %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        metrics.SERVING.labels(self._service).set(1 if serving else 0)

    async def set_versions(self, versions: Sequence[str]) -> None:
        """Publish the model versions this process can serve as health names
        `<service>@<version>` (SERVING, and NOT_SERVING once a version is retired), so that
        a caller can ask whether this server has a version before it switches to it (the
        gateway does, see `services.gateway.app`)."""
        servable = set(versions)
        for version in sorted(servable | self._versions):
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if version in servable
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in self._names[1:]:
                await self._health.set(version_health_name(name, version), status)
        self._versions = servable | self._versions

    async def shutting_down(self) -> None:
        # enter_graceful_shutdown sets every name NOT_SERVING and ignores later set() calls,
        # so a model load finishing during shutdown cannot flip the server back to SERVING.
        await self._health.enter_graceful_shutdown()
        self.serving = False
        metrics.SERVING.labels(self._service).set(0)


class Application(Protocol):
    """A service's business side, testable without the host."""

    @property
    def name(self) -> str:
        """ "recall", "rank", "gateway": the metrics and log label."""

    @property
    def service_names(self) -> Sequence[str]:
        """Full gRPC service names, e.g. "recsys.v1.Recall"."""

    def register(self, server: aio.Server) -> None:
        """Add the servicers to the server."""

    async def start(self, readiness: Readiness) -> None:
        """Start background work; call `readiness.set_serving(True)` once able to answer."""

    async def stop(self) -> None:
        """Release resources after the server stopped taking calls."""


def _server_credentials(settings: ServerSettings) -> grpc.ServerCredentials:
    assert settings.tls_cert_file is not None
    assert settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _connection_age(settings: ServerSettings) -> tuple[tuple[str, int], ...]:
    """A connection lives at most `max_connection_age_seconds` (then GOAWAY: the client
    reconnects, possibly to another pod, and calls in flight get the shutdown grace to end), so
    that pods added by an autoscaler receive calls without a service mesh."""
    if settings.max_connection_age_seconds is None:
        return ()
    return (
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(max(settings.grace_seconds, 1.0) * 1000)),
    )


class GrpcHost:
    """One grpc.aio server hosting one application."""

    def __init__(
        self,
        app: Application,
        settings: ServerSettings,
        *,
        reuse_port: bool = False,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        """`span_exporter` (tests): where this host's spans go when its settings switch
        tracing on, instead of the exporter the OTEL_* variables name."""
        self.app = app
        self.settings = settings
        # None when tracing is off: then no interceptor, no middleware, no span anywhere.
        self.tracing: Tracing | None = tracing_for(app.name, settings.tracing, span_exporter)
        # An application serving a public API (the gateway) brings its caller authentication.
        self.guard = CallGuard(app.name, settings.admission_policy(), auth=getattr(app, "caller_auth", None))
        # An application with another edge (the gateway's HTTP port) admits its calls through
        # the same limit and queue, so both edges share one view of the process's load.
        attach = getattr(app, "attach_guard", None)
        if attach is not None:
            attach(self.guard)
        attach_tracing = getattr(app, "attach_tracing", None)
        if self.tracing is not None and attach_tracing is not None:
            attach_tracing(self.tracing)
        # The tracing interceptor outermost: a call's span covers its admission too.
        self.interceptors: tuple[aio.ServerInterceptor, ...] = (
            (self.tracing.server_interceptor(), self.guard) if self.tracing is not None else (self.guard,)
        )
        size = settings.max_message_bytes
        self.server = aio.server(
            interceptors=self.interceptors,
            options=(
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                # Let clients keep idle connections alive with pings (see channels.py).
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                *_connection_age(settings),
            ),
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.readiness = Readiness(app.name, self.health, app.service_names)
        app.register(self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (*app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        self.port = 0
        self._stopping = False

    async def start(self) -> int:
        await self.readiness.set_serving(False)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if self.settings.tls_enabled:
                self.port = self.server.add_secure_port(address, _server_credentials(self.settings))
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as error:  # grpc's bind failure: an OSError, so the CLI says it in one line
            raise OSError(f"could not bind {address} (is the port in use?)") from error
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await self.server.start()
        log.info(
            "grpc server listening",
            extra={"host": self.settings.host, "port": self.port, "tls": self.settings.tls_enabled},
        )
        await self.app.start(self.readiness)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING → (delay for load balancers) → refuse new calls → let in-flight
        calls finish within the grace → stop the application."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("shutting down", extra={"grace_seconds": grace, "in_flight": self.guard.in_flight})
        await self.readiness.shutting_down()
        if self.settings.shutdown_delay_seconds:
            await asyncio.sleep(self.settings.shutdown_delay_seconds)
        self.guard.draining = True
        await self.server.stop(grace)
        await self.app.stop()
        if self.tracing is not None:  # the spans still queued for export (a bounded wait)
            await asyncio.to_thread(self.tracing.shutdown)
        log.info("stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve_until_signalled(
    app: Application, settings: ServerSettings, *, reuse_port: bool = False
) -> None:
    """Run one host until SIGTERM or SIGINT, then stop it gracefully."""
    host = GrpcHost(app, settings, reuse_port=reuse_port)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await host.start()
    terminated = asyncio.ensure_future(host.wait())
    signalled = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait((terminated, signalled), return_when=asyncio.FIRST_COMPLETED)
    # A second signal during the grace period is ignored: the supervisor (or the
    # orchestrator) escalates to SIGKILL if the grace runs out.
    await host.stop()
    for task in (terminated, signalled):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run_async(main: Callable[[], Coroutine[Any, Any, None]], *, use_uvloop: bool = True) -> None:
    """Run a coroutine function on uvloop when it is installed, asyncio otherwise."""
    loop_factory = None
    if use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:  # optional: asyncio's loop works, a little slower
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


@dataclass(frozen=True)
class ServiceSpec:
    """How to make a service's application; picklable, so worker processes can be spawned
    with it (`create_app` must be a module-level function)."""

    name: str
    create_app: Callable[[Any], Application]


def run_process(
    spec: ServiceSpec,
    settings: ServerSettings,
    *,
    reuse_port: bool = False,
    worker_index: int | None = None,
) -> None:
    """The body of one serving process: the only one, or worker `worker_index` of several
    (whose metrics the supervisor serves)."""
    label = spec.name if worker_index is None else f"{spec.name}/{worker_index}"
    configure_logging(label, settings.log_format, settings.log_level)
    metrics_server = None
    if worker_index is None and settings.metrics_port is not None:
        metrics_server = metrics.start_metrics_server(
            settings.metrics_host or settings.host, settings.metrics_port
        )
        log.info("metrics listening", extra={"metrics_port": metrics_server.port})

    async def main() -> None:
        await serve_until_signalled(spec.create_app(settings), settings, reuse_port=reuse_port)

    try:
        run_async(main, use_uvloop=settings.use_uvloop)
    finally:
        if metrics_server is not None:
            metrics_server.close()
