"""`recsys up --redis` started by a test: the stack as real processes on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.processes import ROOT


def free_ports(count: int, *, consecutive: bool = False) -> list[int]:
    """Ports free right now (`consecutive`: a run of `count`, as `up` derives its metrics
    ports from one)."""
    if consecutive:
        for _ in range(100):
            (first,) = free_ports(1)
            ports = list(range(first, first + count))
            if all(_bindable(port) for port in ports):
                return ports
        raise RuntimeError(f"no {count} consecutive free ports found")
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return port < 65536


@dataclass
class UpProcess:
    process: subprocess.Popen[str]
    ports: dict[str, int]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            reader = threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            reader.start()
            self.readers.append(reader)

    @staticmethod
    def _collect(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for_stdout(self, text: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not any(text in line for line in self.stdout):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from recsys up:\n" + "\n".join(self.stdout + self.stderr))
            time.sleep(0.1)

    def wait_serving(self, seconds: float = 240) -> None:
        self.wait_for_stdout("SERVING (Ctrl-C to stop)", seconds)

    def pids(self) -> dict[str, int]:
        (line,) = [line for line in self.stdout if line.startswith("pids")]
        return {name: int(pid) for name, pid in (pair.split("=") for pair in line.split()[1:])}

    def stop(self) -> None:
        """SIGTERM (as Ctrl-C would), then the pipes are read to the end and closed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.close()

    def close(self) -> None:
        """After the process exited: the readers have seen everything, the pipes are closed."""
        for reader in self.readers:
            reader.join(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def start_up(
    store: Path,
    redis_url: str,
    prefix: str,
    *flags: str,
    metrics: bool = False,
    env: dict[str, str] | None = None,
) -> UpProcess:
    """`recsys up --redis` on free ports (metrics: gateway on `ports["metrics"]`, recall +1,
    rank +2, when `metrics`)."""
    gateway, recall, rank = free_ports(3)
    ports = {"gateway": gateway, "recall": recall, "rank": rank}
    if metrics:
        ports["metrics"] = free_ports(3, consecutive=True)[0]
    command = [
        sys.executable,
        "-m",
        "recsys.cli",
        "up",
        "--store",
        str(store),
        "--redis",
        redis_url,
        "--redis-prefix",
        prefix,
        "--gateway-port",
        str(gateway),
        "--recall-port",
        str(recall),
        "--rank-port",
        str(rank),
        "--http-port",
        "-1",
        "--metrics-port",
        str(ports.get("metrics", -1)),
        "--shutdown-delay",
        "0",
        *flags,
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return UpProcess(process, ports)


async def serving(port: int, service: str = "") -> bool:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
