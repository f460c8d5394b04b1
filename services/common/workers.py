"""`--workers N`: N serving processes on one port, one per core.

Python runs one core per process, so a 2-core pod serves with 2 workers. The supervisor
(this process) never creates a gRPC object: it reserves the port, spawns the workers with
the `spawn` start method (fresh interpreters, so no gRPC state is ever forked), and each
worker binds the same port with SO_REUSEPORT; the kernel spreads new connections across
them. The supervisor forwards SIGTERM/SIGINT, waits out the grace period, restarts a
worker that dies unexpectedly, and serves the workers' summed metrics on the one metrics
port (prometheus_client multiprocess mode, see `services.common.metrics`). The workers
inherit PROMETHEUS_MULTIPROC_DIR from the supervisor's environment at spawn time, which is
what switches their prometheus_client into multiprocess mode; the supervisor itself records
nothing, it only reads the directory.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from prometheus_client import multiprocess

from services.common.logs import configure_logging
from services.common.metrics import start_metrics_server
from services.common.server import ServiceSpec, run_process
from services.common.settings import ServerSettings

log = logging.getLogger("recsys.supervisor")

RESTART_DELAY_SECONDS = 1.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket so the port is ours and known
    before the workers bind it too; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock


def _worker_main(spec: ServiceSpec, settings: ServerSettings, index: int) -> None:
    # The supervisor handles Ctrl-C for the group; a worker shuts down on the SIGTERM it
    # forwards (the worker's own handlers are installed by serve_until_signalled).
    run_process(spec, settings, reuse_port=True, worker_index=index)


class Supervisor:
    def __init__(self, spec: ServiceSpec, settings: ServerSettings) -> None:
        self.spec = spec
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._stopping = threading.Event()

    def _spawn(self, index: int, settings: ServerSettings) -> None:
        process = self._context.Process(
            target=_worker_main, args=(self.spec, settings, index), name=f"{self.spec.name}-worker-{index}"
        )
        process.start()
        self._workers[index] = process
        log.info("worker started", extra={"worker": index, "pid": process.pid})

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self._stopping.is_set():
            log.info("stopping workers", extra={"signal": signal.Signals(signum).name})
            self._stopping.set()

    def run(self) -> int:
        """Serve until signalled; returns the exit status."""
        settings = self.settings
        configure_logging(self.spec.name, settings.log_format, settings.log_level)
        reservation = reserve_port(settings.host, settings.port)
        port = reservation.getsockname()[1]
        worker_settings = settings.model_copy(update={"port": port})
        own_dir = None
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            own_dir = tempfile.mkdtemp(prefix=f"recsys-{self.spec.name}-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
        metrics_server = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for index in range(settings.workers):
                self._spawn(index, worker_settings)
            log.info(
                "grpc server listening",
                extra={"host": settings.host, "port": port, "workers": settings.workers},
            )
            if settings.metrics_port is not None:
                metrics_server = start_metrics_server(
                    settings.metrics_host or settings.host, settings.metrics_port, aggregate=True
                )
                log.info("metrics listening", extra={"metrics_port": metrics_server.port})
            self._watch(worker_settings)
            return self._stop_workers()
        finally:
            if metrics_server is not None:
                metrics_server.close()
            reservation.close()
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)

    def _watch(self, worker_settings: ServerSettings) -> None:
        while not self._stopping.wait(0.2):
            for index, process in list(self._workers.items()):
                if process.is_alive() or self._stopping.is_set():
                    continue
                log.error("worker died; restarting", extra={"worker": index, "exitcode": process.exitcode})
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                time.sleep(RESTART_DELAY_SECONDS)
                self._spawn(index, worker_settings)

    def _stop_workers(self) -> int:
        for process in self._workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_delay_seconds + self.settings.grace_seconds + 5.0
        status = 0
        for index, process in self._workers.items():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker did not stop within the grace period; killing", extra={"worker": index})
                process.kill()
                process.join()
                status = 1
            elif process.exitcode not in (0, -signal.SIGTERM):
                status = 1
        log.info("all workers stopped")
        return status


def serve(spec: ServiceSpec, settings: ServerSettings) -> int:
    """Run a service with `settings.workers` processes; returns the exit status."""
    if settings.workers == 1:
        run_process(spec, settings)
        return 0
    return Supervisor(spec, settings).run()
