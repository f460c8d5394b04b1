"""`recsys up --redis` as an operator runs it: real processes, a real Redis, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.auth import hash_api_key
from tests.recsys.feature_store import REDIS_URL
from tests.support.certificates import TestCa
from tests.support.stack import UpProcess, free_ports, serving, start_up

pytestmark = pytest.mark.slow

SCENES = {"scenes": {"tiny": {"count": {"default": 3, "max": 5}}}}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def restarted(up: UpProcess) -> bool:
    return any("rank SERVING again" in line for line in up.stderr)


async def test_up_redis_serves_the_given_scene_restarts_a_killed_service_and_stops_clean(
    quick_store: Any, tmp_path: Path, prefix: str, stacks: list[UpProcess]
) -> None:
    scenes = tmp_path / "scenes.json"
    scenes.write_text(json.dumps(SCENES))
    up = start_up(quick_store.path, REDIS_URL, prefix, "--scenes", str(scenes))
    stacks.append(up)
    await asyncio.to_thread(up.wait_serving)
    pids = up.pids()
    async with aio.insecure_channel(f"127.0.0.1:{up.ports['gateway']}") as channel:
        stub = gateway_pb2_grpc.RecommenderStub(channel)

        async def recommend() -> gateway_pb2.RecommendResponse:
            request = gateway_pb2.RecommendRequest(user_id="196", scene="tiny", count=3, dry_run=True)
            response: gateway_pb2.RecommendResponse = await stub.Recommend(request, timeout=5)
            return response

        # The scene exists only in the file given to `up`: the gateway got it.
        first = await recommend()
        assert first.scene == "tiny"
        assert len(first.items) == 3
        assert list(first.degraded_reasons) == []

        os.kill(pids["rank"], signal.SIGKILL)
        # While rank is down and starting again, the gateway keeps answering (degraded).
        answered_while_down = 0
        async with asyncio.timeout(180):
            while not (
                await serving(up.ports["rank"]) and any("rank SERVING again" in line for line in up.stderr)
            ):
                await recommend()
                answered_while_down += 1
                await asyncio.sleep(0.1)
        assert answered_while_down > 0
        async with asyncio.timeout(10):
            while list((await recommend()).degraded_reasons):
                await asyncio.sleep(0.05)
        assert any("rank exited with status -9; restarting" in line for line in up.stderr)
        assert alive(pids["recall"])
        assert alive(pids["gateway"])

    up.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(up.process.wait, 60) == 0
    (again,) = [line for line in up.stderr if "rank SERVING again" in line]
    restarted_rank = int(again.rsplit("pid ", 1)[1].rstrip(")"))
    for pid in [*pids.values(), restarted_rank]:
        assert not alive(pid)


def test_a_service_failing_to_start_is_reported_in_one_line_and_not_retried(
    quick_store: Any, prefix: str, stacks: list[UpProcess]
) -> None:
    # A setting rank refuses (the environment reaches the services, not `up`'s own checks).
    up = start_up(quick_store.path, REDIS_URL, prefix, env={"RECSYS_RANK_MAX_BATCH_ROWS": "0"})
    stacks.append(up)
    assert up.process.wait(120) == 2
    up.close()
    errors = [line for line in up.stderr if line.startswith("recsys up: error:")]
    assert len(errors) == 1, "\n".join(up.stderr)
    assert "rank failed during start-up" in errors[0]
    assert "not retried" in errors[0]
    assert "RECSYS_RANK_MAX_BATCH_ROWS" in errors[0]
    assert sum("restarting" in line for line in up.stderr) == 0


def _held_port() -> socket.socket:
    """A port another process would hold: bound and listening on loopback."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


@pytest.mark.parametrize(
    ("flag", "redis"),
    [("--http-port", False), ("--recall-port", False), ("--rank-port", True), ("--metrics-port", True)],
)
def test_up_next_to_another_stack_names_the_flag_of_the_port_in_use(
    quick_store: Any, flag: str, redis: bool
) -> None:
    free = [str(port) for port in free_ports(3)]
    with closing(_held_port()) as taken:
        port = taken.getsockname()[1]
        flags = {"--gateway-port": free[0], "--recall-port": free[1], "--rank-port": free[2]}
        flags |= {"--http-port": "-1", "--metrics-port": "-1", flag: str(port)}
        command = [sys.executable, "-m", "recsys.cli", "up", "--store", str(quick_store.path)]
        command += [item for pair in flags.items() for item in pair]
        command += ["--redis", REDIS_URL] if redis else []
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"recsys up: error: {flag} {port}: address 127.0.0.1:{port} is already in use"
    ]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("service", "flag"), [("recall", "--port"), ("gateway", "--http-port"), ("rank", "--metrics-port")]
)
def test_serve_on_a_port_in_use_names_the_flag(tmp_path: Path, service: str, flag: str) -> None:
    with closing(_held_port()) as taken:
        port = taken.getsockname()[1]
        flags = {"--port": "0", "--metrics-port": "-1", flag: str(port)}
        if service == "gateway":
            flags.setdefault("--http-port", "-1")
        command = [sys.executable, "-m", "recsys.cli", "serve", service, "--store", str(tmp_path)]
        command += [item for pair in flags.items() for item in pair]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"recsys serve {service}: error: {flag} {port}: address 127.0.0.1:{port} is already in use"
    ]


def recsys_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_up_redis_runs_every_hop_over_mtls_with_auth_and_the_cli_reaches_it(
    quick_store: Any, tmp_path: Path, prefix: str, stacks: list[UpProcess]
) -> None:
    ca = TestCa(tmp_path)
    server, hop, cli = ca.issue("server", server=True), ca.issue("up-client"), ca.issue("cli")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"sha256": hash_api_key("key-196"), "subject": "196"}]}))
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(ca.cert)]
    tls += ["--tls-ca", str(ca.cert), "--tls-client-cert", str(hop.cert), "--tls-client-key", str(hop.key)]
    env = {"RECSYS_GATEWAY_AUTH_REQUIRED": "true", "RECSYS_GATEWAY_AUTH_API_KEYS_FILE": str(keys)}
    up = start_up(quick_store.path, REDIS_URL, prefix, *tls, env=env)
    stacks.append(up)
    # `up`'s readiness check reached every service over mTLS, and the gateway recall and rank.
    await asyncio.to_thread(up.wait_serving)
    addr = f"127.0.0.1:{up.ports['gateway']}"
    client = [
        "--addr",
        addr,
        "--tls-ca",
        str(ca.cert),
        "--tls-cert",
        str(cli.cert),
        "--tls-key",
        str(cli.key),
    ]
    answer = await asyncio.to_thread(
        recsys_cli,
        "recommend",
        "--user",
        "196",
        "--count",
        "3",
        "--dry-run",
        "--json",
        "--token",
        "key-196",
        *client,
    )
    assert answer.returncode == 0, answer.stderr
    body = json.loads(answer.stdout)
    assert len(body["items"]) == 3
    assert "degraded_reasons" not in body  # recall and rank answered over mTLS
    # The certificate alone names the caller "cli", which may not act for user 196.
    refused = await asyncio.to_thread(recsys_cli, "recommend", "--user", "196", "--dry-run", *client)
    assert refused.returncode != 0
    assert "PERMISSION_DENIED" in refused.stderr
    # No client certificate: the gateway's port does not serve it at all.
    anonymous = await asyncio.to_thread(
        recsys_cli,
        "recommend",
        "--user",
        "196",
        "--token",
        "key-196",
        "--addr",
        addr,
        "--tls-ca",
        str(ca.cert),
    )
    assert anonymous.returncode != 0
    assert "UNAVAILABLE" in anonymous.stderr
    assert not await serving(up.ports["recall"])  # plaintext health is refused too
