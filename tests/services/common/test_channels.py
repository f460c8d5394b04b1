"""Client channels: request ids cross hops, retries for idempotent calls, calls spread over
every address a target resolves to, TLS and mTLS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc import aio

from recsys.v1 import recall_pb2, recall_pb2_grpc
from services.common.channels import create_channel, service_config
from services.common.logs import request_id_var
from services.common.settings import ClientSettings
from tests.conftest import HostFactory


async def test_the_current_request_id_is_forwarded(start_host: HostFactory) -> None:
    running = await start_host()
    channel = create_channel(running.address)
    try:
        token = request_id_var.set("upstream-7")
        try:
            call = recall_pb2_grpc.RecallStub(channel).Recall(
                recall_pb2.RecallRequest(user_id="u"), timeout=5
            )
            await call
        finally:
            request_id_var.reset(token)
        assert dict(await call.trailing_metadata())["x-request-id"] == "upstream-7"
    finally:
        await channel.close()


def test_retry_policy_covers_only_the_idempotent_services() -> None:
    config = json.loads(service_config(["recsys.v1.Recall"], ClientSettings(retry_max_attempts=4)))
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "recsys.v1.Recall"}]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert json.loads(service_config([], ClientSettings())) == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [],
        "healthCheckConfig": {"serviceName": ""},
    }
    assert "healthCheckConfig" not in json.loads(service_config([], ClientSettings(health_checking=False)))
    pick_first = json.loads(service_config([], ClientSettings(load_balancing="pick_first")))
    assert pick_first["loadBalancingConfig"] == [{"pick_first": {}}]


def _make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, all signed by the CA."""
    files = {
        name: directory / name
        for name in ("ca.key", "ca.pem", "server.key", "server.pem", "client.key", "client.pem")
    }

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=recsys-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={who}",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            f"{who}.pem",
        )
    return files


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _make_certificates(tmp_path_factory.mktemp("tls"))


async def test_tls_server_and_client(start_host: HostFactory, certificates: dict[str, Path]) -> None:
    running = await start_host(
        tls_cert_file=certificates["server.pem"], tls_key_file=certificates["server.key"]
    )
    target = f"localhost:{running.host.port}"
    channel = create_channel(target, ClientSettings(tls_ca_file=certificates["ca.pem"]))
    try:
        response = await recall_pb2_grpc.RecallStub(channel).Recall(
            recall_pb2.RecallRequest(user_id="u"), timeout=5
        )
        assert list(response.item_indexes) == [3, 1, 2]
    finally:
        await channel.close()
    # A plaintext client cannot talk to the TLS port.
    async with aio.insecure_channel(target) as plain:
        with pytest.raises(aio.AioRpcError) as refused:
            await recall_pb2_grpc.RecallStub(plain).Recall(recall_pb2.RecallRequest(user_id="u"), timeout=2)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(
    start_host: HostFactory, certificates: dict[str, Path]
) -> None:
    running = await start_host(
        tls_cert_file=certificates["server.pem"],
        tls_key_file=certificates["server.key"],
        tls_client_ca_file=certificates["ca.pem"],
    )
    target = f"localhost:{running.host.port}"
    with_cert = create_channel(
        target,
        ClientSettings(
            tls_ca_file=certificates["ca.pem"],
            tls_cert_file=certificates["client.pem"],
            tls_key_file=certificates["client.key"],
        ),
    )
    without_cert = create_channel(target, ClientSettings(tls_ca_file=certificates["ca.pem"]))
    try:
        ok = await recall_pb2_grpc.RecallStub(with_cert).Recall(
            recall_pb2.RecallRequest(user_id="u"), timeout=5
        )
        assert list(ok.item_indexes) == [3, 1, 2]
        with pytest.raises(aio.AioRpcError) as refused:
            await recall_pb2_grpc.RecallStub(without_cert).Recall(
                recall_pb2.RecallRequest(user_id="u"), timeout=2
            )
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await with_cert.close()
        await without_cert.close()


async def test_a_target_resolving_to_several_pods_spreads_calls_over_all_of_them(
    start_host: HostFactory,
) -> None:
    """What a headless Service gives the gateway: one name, every pod's address. Here the
    addresses are listed (`ipv4:`) instead of resolved from DNS; the balancing is the same."""
    pods = [await start_host() for _ in range(3)]
    target = "ipv4:" + ",".join(pod.address for pod in pods)
    channel = create_channel(target)
    try:
        stub = recall_pb2_grpc.RecallStub(channel)
        for _ in range(60):
            await stub.Recall(recall_pb2.RecallRequest(user_id="u"), timeout=5)
    finally:
        await channel.close()
    calls = [pod.app.servicer.calls for pod in pods]
    assert sum(calls) == 60
    assert min(calls) >= 15, calls  # round_robin: about 20 each; pick_first would give 60, 0, 0
