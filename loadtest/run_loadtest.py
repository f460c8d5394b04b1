"""`make loadtest`: start the local stack, run locust headless against the gateway, print the
summary, write the CSV and HTML reports, and always stop the stack.

    USERS=50 RATE=10 DURATION=2m make loadtest

Environment (defaults in brackets):
  USERS [20]  RATE [5] (users started per second)  DURATION [60s]
  TARGET [127.0.0.1:50051]  the gateway; a non-loopback TARGET means "test that deployment":
                            no local stack is started
  STORE [./store]           built with `recsys build --dataset ml-100k --profile quick` when
                            it has no CURRENT version
  REPORTS [loadtest/reports]  where loadtest_stats.csv, … and loadtest.html are written
  STARTUP_SECONDS [240]     how long the stack may take to report SERVING

Exit status: locust's (1 when any call failed), or 2 when the stack did not start.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the virtualenv running this script has recsys and locust


@dataclass(frozen=True)
class Settings:
    users: int
    rate: float
    duration: str
    target: str
    store: Path
    reports: Path
    startup_seconds: float

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            users=int(os.environ.get("USERS") or 20),
            rate=float(os.environ.get("RATE") or 5),
            duration=os.environ.get("DURATION") or "60s",
            target=os.environ.get("TARGET") or "127.0.0.1:50051",
            store=Path(os.environ.get("STORE") or "./store").resolve(),
            reports=Path(os.environ.get("REPORTS") or "loadtest/reports").resolve(),
            startup_seconds=float(os.environ.get("STARTUP_SECONDS") or 240),
        )


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: unwind so that the stack is stopped on the way out."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"TARGET: expected host:port, got {target!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serving(target: str, timeout: float = 1.0) -> bool:
    """True when the gateway's health service answers SERVING for the whole server."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def ensure_store(store: Path) -> None:
    if (store / "CURRENT").is_file():
        return
    print(f"loadtest: {store} has no model version; building a quick one (a few minutes) …", flush=True)
    subprocess.run(
        [str(BIN / "recsys"), "build", "--dataset", "ml-100k", "--profile", "quick", "--store", str(store)],
        check=True,
        cwd=ROOT,
    )


def start_stack(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    _, port = split_target(settings.target)
    command = [
        *(str(BIN / "recsys"), "up", "--store", str(settings.store)),
        *("--gateway-port", str(port), "--http-port", "-1"),  # no HTTP: locust speaks gRPC
    ]
    print(f"loadtest: starting the stack ({' '.join(command[1:])}); its log: {log}", flush=True)
    with log.open("wb") as output:
        return subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)


def wait_serving(settings: Settings, stack: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + settings.startup_seconds
    while not serving(settings.target):
        if stack is not None and stack.poll() is not None:
            raise RuntimeError(f"the stack exited with status {stack.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{settings.target} not SERVING after {settings.startup_seconds:.0f} s")
        time.sleep(0.5)
    print(f"loadtest: {settings.target} is SERVING", flush=True)


def stop_stack(stack: subprocess.Popen[bytes]) -> None:
    # A second Ctrl-C must not interrupt the stopping and leave the services running.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if stack.poll() is None:
        stack.send_signal(signal.SIGTERM)  # `recsys up` stops gateway, rank, recall in order
        try:
            stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait()
    print(f"loadtest: stack stopped (status {stack.returncode})", flush=True)


def run_locust(settings: Settings, prefix: Path) -> int:
    environment = {**os.environ, "LOADTEST_SUMMARY": f"{prefix}_summary.json"}
    command = [
        str(BIN / "locust"),
        f"--locustfile={ROOT / 'loadtest' / 'locustfile.py'}",
        "--headless",
        f"--users={settings.users}",
        f"--spawn-rate={settings.rate}",
        f"--run-time={settings.duration}",
        f"--host={settings.target}",
        f"--csv={prefix}",
        f"--html={prefix}.html",
        "--only-summary",
        # Let in-flight calls finish (each has a 1 s deadline) instead of counting them lost.
        "--stop-timeout=5",
    ]
    print(
        f"loadtest: {settings.users} users (+{settings.rate}/s) for {settings.duration} against "
        f"{settings.target}",
        flush=True,
    )
    return subprocess.run(command, cwd=ROOT, env=environment, check=False).returncode


def summary(path: Path) -> str:
    """A table of the locustfile's final summary (LOADTEST_SUMMARY): req/s, p50/p95/p99, failures."""
    document = json.loads(path.read_text(encoding="utf-8"))
    rows = document["calls"]
    width = max([len("call"), *(len(row["name"]) for row in rows)])
    lines = [
        f"{'call':<{width}}  {'requests':>9}  {'req/s':>8}  {'p50 ms':>7}  {'p95 ms':>7}  "
        f"{'p99 ms':>7}  failures"
    ]
    for row in rows:
        share = 100.0 * row["failures"] / row["requests"] if row["requests"] else 0.0
        lines.append(
            f"{row['name']:<{width}}  {row['requests']:>9}  {row['rps']:>8.1f}  {row['p50_ms']:>7}  "
            f"{row['p95_ms']:>7}  {row['p99_ms']:>7}  {row['failures']} ({share:.2f} %)"
        )
    recommend = document["recommend"]
    if recommend["answers"]:
        share = 100.0 * recommend["degraded"] / recommend["answers"]
        lines.append(f"degraded answers: {recommend['degraded']} of {recommend['answers']} ({share:.2f} %)")
    return "\n".join(lines)


def main() -> int:
    settings = Settings.from_env()
    host, _ = split_target(settings.target)
    local = is_loopback(host)
    settings.reports.mkdir(parents=True, exist_ok=True)
    prefix = settings.reports / "loadtest"
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stack: subprocess.Popen[bytes] | None = None
    try:
        if local:
            ensure_store(settings.store)
            stack = start_stack(settings, settings.reports / "stack.log")
        else:
            print(f"loadtest: {settings.target} is not loopback: testing it as deployed, no local stack")
        wait_serving(settings, stack)
        status = run_locust(settings, prefix)
    except (Stopped, RuntimeError, subprocess.CalledProcessError) as error:
        print(f"loadtest: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if stack is not None:
            stop_stack(stack)
    final = Path(f"{prefix}_summary.json")
    if final.is_file():
        print(f"\n{summary(final)}\n")
    print(
        f"loadtest: reports in {settings.reports}/: loadtest.html, loadtest_*.csv, "
        "loadtest_summary.json, stack.log"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
