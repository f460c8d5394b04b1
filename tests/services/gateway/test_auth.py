"""Caller authentication, the act-for-yourself rule and the per-caller rate limit against the
real stack on loopback: API keys and JWTs on a plaintext stack, client certificates on a stack
whose every hop (client → gateway gRPC and HTTP, gateway → recall and rank) is mTLS. Keys and
certificates are made by the test (tests/support/certificates.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.client import NO_RETRIES, Event, Recommender, RecommenderError, RetryPolicy, SyncRecommender, Tls
from recsys.feature_store import InProcessFeatureStore
from recsys.store import ModelStore
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.auth import SERVICE_SCOPE
from services.common.server import GrpcHost
from services.common.settings import ClientSettings
from services.gateway.app import GatewayApp
from services.gateway.settings import GatewaySettings
from services.rank.app import RankApp
from services.rank.settings import RankSettings
from services.recall.app import RecallApp
from services.recall.settings import RecallSettings
from tests.services.gateway.test_gateway import Stack, start_stack, stop_stack
from tests.support.certificates import TestCa, private_pem, public_pem, rsa_key
from tests.support.hosts import wait_until_serving

AUDIENCE, ISSUER = "recsys-gateway", "https://login.test"
USER_KEY, SERVICE_KEY = "user-196-key", "web-backend-key"  # made up here, hashed into the keys file
BURST = 20


@dataclass
class Keys:
    signing: bytes  # the issuer's private key (PEM)
    other: bytes  # a key the gateway does not trust


def token(
    keys: Keys, subject: str, *, expires_in: float = 300, key: bytes | None = None, **claims: Any
) -> str:
    now = int(time.time())
    payload = {"sub": subject, "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + int(expires_in)}
    payload.update(claims)
    return jwt.encode(payload, key or keys.signing, algorithm="RS256")


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


def click(user_id: str, event_id: str) -> gateway_pb2.Event:
    return gateway_pb2.Event(
        event_id=event_id, user_id=user_id, item_id="50", type=gateway_pb2.EVENT_TYPE_CLICK
    )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(private_pem(rsa_key()), private_pem(rsa_key()))


@pytest.fixture(scope="module")
async def stack(
    quick_store: ModelStore, tmp_path_factory: pytest.TempPathFactory, keys: Keys
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("auth")
    api_keys = tmp / "api-keys.json"
    api_keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"sha256": hashlib.sha256(USER_KEY.encode()).hexdigest(), "subject": "196"},
                    {
                        "sha256": hashlib.sha256(SERVICE_KEY.encode()).hexdigest(),
                        "subject": "web",
                        "scopes": [SERVICE_SCOPE],
                    },
                ]
            }
        )
    )
    public = tmp / "jwt.pub"
    public.write_bytes(public_pem_of(keys.signing))
    running = await start_stack(
        quick_store,
        tmp,
        InProcessFeatureStore(),
        auth_required=True,
        auth_api_keys_file=api_keys,
        auth_jwt_key_file=public,
        auth_jwt_audience=AUDIENCE,
        auth_jwt_issuer=ISSUER,
        rate_limit_per_second=1.0,
        rate_limit_burst=BURST,
        http_ui=True,
    )
    yield running
    await stop_stack(running)


def public_pem_of(private: bytes) -> bytes:
    key = load_pem_private_key(private, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return public_pem(key)


async def grpc_code(call: Any) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as raised:
        await call
    return raised.value.code()


def http_base(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.gateway_app.http.port}"


async def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, **options: Any
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body, headers=headers, **options) as response,
    ):
        return response.status, await response.json(content_type=None)


# -- no credentials -----------------------------------------------------------------------------
async def test_a_call_without_credentials_is_unauthenticated_but_probes_stay_open(stack: Stack) -> None:
    request = gateway_pb2.RecommendRequest(user_id="196", count=3, dry_run=True)
    assert await grpc_code(stack.stub.Recommend(request, timeout=5)) is grpc.StatusCode.UNAUTHENTICATED
    assert (
        await grpc_code(
            stack.stub.ReportEvents(gateway_pb2.ReportEventsRequest(events=[click("196", "n-1")]))
        )
        is grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        await grpc_code(stack.stub.Recommend(request, metadata=bearer("not-a-key"), timeout=5))
        is grpc.StatusCode.UNAUTHENTICATED
    )
    health = await health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    status, body = await http("POST", f"{http_base(stack)}/v1/recommend", {"user_id": "196", "dry_run": True})
    assert status == 401
    assert body["error"]["code"] == "UNAUTHENTICATED"
    status, body = await http(
        "POST", f"{http_base(stack)}/v1/recommend", {"user_id": "196"}, {"Authorization": "Basic eDp5"}
    )
    assert (status, body["error"]["code"]) == (401, "UNAUTHENTICATED")
    status, _ = await http("GET", f"{http_base(stack)}/healthz")
    assert status == 200


# -- API keys and the act-for-yourself rule -----------------------------------------------------
async def test_an_api_key_acts_for_its_own_user_only(stack: Stack) -> None:
    own = await stack.stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="196", count=3, dry_run=True),
        metadata=bearer(USER_KEY),
        timeout=5,
    )
    assert len(own.items) == 3
    with pytest.raises(aio.AioRpcError) as raised:
        await stack.stub.Recommend(
            gateway_pb2.RecommendRequest(user_id="197", count=3, dry_run=True), metadata=bearer(USER_KEY)
        )
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (raised.value.details() or "").startswith("user_id:")

    events = gateway_pb2.ReportEventsRequest(
        events=[click("196", f"k-{time.time_ns()}"), click("197", f"k-{time.time_ns()}")]
    )
    with pytest.raises(aio.AioRpcError) as raised:
        await stack.stub.ReportEvents(events, metadata=bearer(USER_KEY), timeout=5)
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (raised.value.details() or "").startswith("events[1].user_id:")

    mine = gateway_pb2.ReportEventsRequest(events=[click("196", f"k-{time.time_ns()}")])
    assert (await stack.stub.ReportEvents(mine, metadata=bearer(USER_KEY), timeout=5)).accepted == 1

    status, body = await http(
        "POST",
        f"{http_base(stack)}/v1/events",
        {"events": [{"user_id": "197", "item_id": "50", "type": "EVENT_TYPE_CLICK", "event_id": "h-1"}]},
        {"Authorization": f"Bearer {USER_KEY}"},
    )
    assert (status, body["error"]["code"]) == (403, "PERMISSION_DENIED")
    assert body["error"]["message"].startswith("events[0].user_id:")


async def test_a_service_scoped_caller_writes_events_for_any_user(stack: Stack) -> None:
    events = gateway_pb2.ReportEventsRequest(
        events=[click("196", f"s-{time.time_ns()}"), click("197", f"s-{time.time_ns()}")]
    )
    answer = await stack.stub.ReportEvents(events, metadata=bearer(SERVICE_KEY), timeout=5)
    assert answer.accepted == 2
    status, body = await http(
        "POST",
        f"{http_base(stack)}/v1/events",
        {
            "events": [
                {
                    "user_id": "198",
                    "item_id": "50",
                    "type": "EVENT_TYPE_CLICK",
                    "event_id": f"s-{time.time_ns()}",
                }
            ]
        },
        {"Authorization": f"Bearer {SERVICE_KEY}"},
    )
    assert (status, body["accepted"]) == (200, 1)


# -- the demo page's history ----------------------------------------------------------------------
async def test_the_history_needs_credentials_for_its_own_user_but_the_page_itself_is_open(
    stack: Stack, keys: Keys
) -> None:
    # Callers of their own (tokens for subjects no other test uses): the rate limit is per caller.
    status, body = await http("GET", f"{http_base(stack)}/v1/users/ui-9/history")
    assert (status, body["error"]["code"]) == (401, "UNAUTHENTICATED")
    own = {"Authorization": f"Bearer {token(keys, 'ui-9')}"}
    status, body = await http("GET", f"{http_base(stack)}/v1/users/ui-9/history", headers=own)
    assert (status, body["user_id"], body["entries"]) == (200, "ui-9", [])
    status, body = await http("GET", f"{http_base(stack)}/v1/users/196/history", headers=own)
    assert (status, body["error"]["code"]) == (403, "PERMISSION_DENIED")
    assert body["error"]["message"].startswith("user_id:")
    service = {"Authorization": f"Bearer {token(keys, 'ui-backend', scope=SERVICE_SCOPE)}"}
    status, body = await http("GET", f"{http_base(stack)}/v1/users/196/history?limit=3", headers=service)
    assert (status, len(body["entries"])) == (200, 3)
    # The page holds no data (it asks for a token and sends it on its calls): no credentials.
    async with aiohttp.ClientSession() as session, session.get(f"{http_base(stack)}/ui") as page:
        assert page.status == 200
        assert "<title>recsys" in await page.text()


# -- JWTs ---------------------------------------------------------------------------------------
async def test_a_valid_jwt_is_accepted_and_its_scope_counts(stack: Stack, keys: Keys) -> None:
    request = gateway_pb2.RecommendRequest(user_id="200", count=2, dry_run=True)
    answer = await stack.stub.Recommend(request, metadata=bearer(token(keys, "200")), timeout=5)
    assert len(answer.items) == 2
    service = token(keys, "batch-job", scope=f"openid {SERVICE_SCOPE}")
    events = gateway_pb2.ReportEventsRequest(events=[click("201", f"j-{time.time_ns()}")])
    assert (await stack.stub.ReportEvents(events, metadata=bearer(service), timeout=5)).accepted == 1
    status, body = await http(
        "GET",
        f"{http_base(stack)}/v1/recommend?user_id=200&count=2&dry_run=true",
        headers={"Authorization": f"Bearer {token(keys, '200')}"},
    )
    assert (status, len(body["items"])) == (200, 2)


@pytest.mark.parametrize(
    "kind", ["expired", "wrongly signed", "wrong audience", "wrong issuer", "no expiry", "alg none"]
)
async def test_a_bad_jwt_is_refused(stack: Stack, keys: Keys, kind: str) -> None:
    now = int(time.time())
    if kind == "expired":
        value = token(keys, "200", expires_in=-3600)
    elif kind == "wrongly signed":
        value = token(keys, "200", key=keys.other)
    elif kind == "wrong audience":
        value = token(keys, "200", aud="someone-else")
    elif kind == "wrong issuer":
        value = token(keys, "200", iss="https://evil.test")
    elif kind == "no expiry":
        value = jwt.encode({"sub": "200", "aud": AUDIENCE, "iss": ISSUER, "iat": now}, keys.signing, "RS256")
    else:
        # Unsigned, as an attacker would write it by hand.
        claims = {"sub": "200", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 300}
        value = (
            ".".join(
                base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
                for part in ({"alg": "none", "typ": "JWT"}, claims)
            )
            + "."
        )
    request = gateway_pb2.RecommendRequest(user_id="200", count=2, dry_run=True)
    with pytest.raises(aio.AioRpcError) as raised:
        await stack.stub.Recommend(request, metadata=bearer(value), timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    if kind == "expired":
        assert "expired" in (raised.value.details() or "")
    status, body = await http(
        "GET",
        f"{http_base(stack)}/v1/recommend?user_id=200&dry_run=true",
        headers={"Authorization": f"Bearer {value}"},
    )
    assert (status, body["error"]["code"]) == (401, "UNAUTHENTICATED")


# -- the per-caller rate limit ------------------------------------------------------------------
async def test_the_rate_limit_refuses_a_caller_past_its_rate_and_only_that_caller(
    stack: Stack, keys: Keys
) -> None:
    hasty = token(keys, f"hasty-{time.time_ns()}")
    request = gateway_pb2.RecommendRequest(user_id="hasty", count=1, dry_run=True)
    codes = []
    for _ in range(BURST + 5):  # 1 call/s refills far slower than this loop calls
        try:
            await stack.stub.Recommend(request, metadata=bearer(hasty), timeout=5)
            codes.append(grpc.StatusCode.OK)
        except aio.AioRpcError as error:
            codes.append(error.code())
    # The subject is not the user: PERMISSION_DENIED counts against the budget like any call.
    assert codes[:BURST] == [grpc.StatusCode.PERMISSION_DENIED] * BURST
    assert codes[BURST:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
    status, body = await http(
        "GET", f"{http_base(stack)}/v1/recommend?user_id=hasty", headers={"Authorization": f"Bearer {hasty}"}
    )
    assert (status, body["error"]["code"]) == (429, "RESOURCE_EXHAUSTED")
    # Another caller is unaffected.
    other = gateway_pb2.RecommendRequest(user_id="196", count=1, dry_run=True)
    assert (await stack.stub.Recommend(other, metadata=bearer(USER_KEY), timeout=5)).items


async def test_the_client_library_sends_its_token_and_retries_past_the_rate_limit(
    stack: Stack, keys: Keys
) -> None:
    target = f"127.0.0.1:{stack.gateway.port}"
    async with Recommender(target, token=USER_KEY, timeout=5) as client:
        assert len((await client.recommend("196", count=2, dry_run=True)).items) == 2
    async with Recommender(target, timeout=5) as anonymous:
        with pytest.raises(RecommenderError) as refused:
            await anonymous.recommend("196", count=2, dry_run=True)
    assert (refused.value.code, refused.value.attempts) == (grpc.StatusCode.UNAUTHENTICATED, 1)
    # A real RESOURCE_EXHAUSTED: this caller's burst used up, the bucket refills 1 call/s.
    subject = f"patient-{time.time_ns()}"
    bearer_token = token(keys, subject)
    async with Recommender(target, token=bearer_token, timeout=5, retry=NO_RETRIES) as once:
        for _ in range(BURST):
            await once.recommend(subject, count=1, dry_run=True)
        with pytest.raises(RecommenderError) as shed:
            await once.recommend(subject, count=1, dry_run=True)
    assert (shed.value.code, shed.value.attempts) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 1)
    patient = RetryPolicy(max_attempts=12, initial_backoff=0.4, max_backoff=1.0)
    async with Recommender(target, token=bearer_token, timeout=8, retry=patient) as client:
        started = time.monotonic()
        answer = await client.recommend(subject, count=1, dry_run=True)
        waited = time.monotonic() - started
    assert answer.cold_start
    assert waited > 0.2  # it got through only once a token had come back, after retries


# -- mTLS everywhere ----------------------------------------------------------------------------
@dataclass
class TlsStack:
    recall: GrpcHost
    rank: GrpcHost
    gateway: GrpcHost
    app: GatewayApp
    ca: TestCa
    tmp: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def channel(self, client: str | None) -> aio.Channel:
        chain = key = None
        if client is not None:
            issued = self.tmp / f"{client}.crt"
            chain, key = issued.read_bytes(), (self.tmp / f"{client}.key").read_bytes()
        credentials = grpc.ssl_channel_credentials(self.ca.cert.read_bytes(), key, chain)
        return aio.secure_channel(self.address, credentials)

    def ssl_context(self, client: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        if client is not None:
            context.load_cert_chain(self.tmp / f"{client}.crt", self.tmp / f"{client}.key")
        return context


@pytest.fixture(scope="module")
async def tls_stack(
    quick_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TlsStack]:
    tmp = tmp_path_factory.mktemp("mtls")
    ca = TestCa(tmp)
    server = ca.issue("server", server=True)
    hop = ca.issue("gateway-client")  # the gateway's certificate towards recall and rank
    for name in ("196", "web-backend"):
        ca.issue(name)
    tls: dict[str, Any] = {
        "tls_cert_file": server.cert,
        "tls_key_file": server.key,
        "tls_client_ca_file": ca.cert,
    }
    features = InProcessFeatureStore()
    recall_settings = RecallSettings(store=str(quick_store.path), port=0, metrics_port=None, **tls)
    recall = GrpcHost(RecallApp(recall_settings, features=features), recall_settings)
    await recall.start()
    rank_settings = RankSettings(store=str(quick_store.path), port=0, metrics_port=None, **tls)
    rank = GrpcHost(RankApp(rank_settings, features=features), rank_settings)
    await rank.start()
    settings = GatewaySettings(
        store=str(quick_store.path),
        port=0,
        http_port=0,
        metrics_port=None,
        recall_addr=f"127.0.0.1:{recall.port}",
        rank_addr=f"127.0.0.1:{rank.port}",
        event_log=tmp / "events.csv",
        default_deadline_ms=10_000,
        recall_timeout_ms=4000,
        rank_timeout_ms=4000,
        auth_required=True,
        auth_service_certificates="web-backend",
        client=ClientSettings(tls=True, tls_ca_file=ca.cert, tls_cert_file=hop.cert, tls_key_file=hop.key),
        **tls,
    )
    app = GatewayApp(settings, features=features)
    gateway = GrpcHost(app, settings)
    await gateway.start()
    await wait_until_serving(recall, rank, gateway)
    yield TlsStack(recall, rank, gateway, app, ca, tmp)
    for host in (gateway, rank, recall):
        await host.stop(grace=0)


async def test_grpc_callers_are_named_by_their_certificate_and_internal_hops_run_mtls(
    tls_stack: TlsStack,
) -> None:
    channel = tls_stack.channel("196")
    try:
        stub = gateway_pb2_grpc.RecommenderStub(channel)
        answer = await stub.Recommend(
            gateway_pb2.RecommendRequest(user_id="196", count=3, dry_run=True), timeout=10
        )
        # Served by recall and rank over mTLS: no fallback, no degraded reason.
        assert len(answer.items) == 3
        assert list(answer.degraded_reasons) == []
        events = gateway_pb2.ReportEventsRequest(events=[click("197", f"c-{time.time_ns()}")])
        assert await grpc_code(stub.ReportEvents(events, timeout=5)) is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await channel.close()
    backend = tls_stack.channel("web-backend")
    try:
        events = gateway_pb2.ReportEventsRequest(events=[click("197", f"c-{time.time_ns()}")])
        answer_events = await gateway_pb2_grpc.RecommenderStub(backend).ReportEvents(events, timeout=5)
        assert answer_events.accepted == 1
    finally:
        await backend.close()
    # Without a client certificate the TLS handshake itself fails.
    anonymous = tls_stack.channel(None)
    try:
        request = gateway_pb2.RecommendRequest(user_id="196", count=1, dry_run=True)
        assert await grpc_code(gateway_pb2_grpc.RecommenderStub(anonymous).Recommend(request, timeout=5)) is (
            grpc.StatusCode.UNAVAILABLE
        )
    finally:
        await anonymous.close()


async def test_the_http_port_honours_mtls(tls_stack: TlsStack) -> None:
    port = tls_stack.app.http.port
    base = f"https://127.0.0.1:{port}"
    status, body = await http(
        "GET", f"{base}/v1/recommend?user_id=196&count=2&dry_run=true", ssl=tls_stack.ssl_context("196")
    )
    assert (status, len(body["items"])) == (200, 2)
    status, body = await http(
        "POST",
        f"{base}/v1/events",
        {"events": [{"user_id": "197", "item_id": "50", "type": "EVENT_TYPE_CLICK", "event_id": "m-1"}]},
        ssl=tls_stack.ssl_context("196"),
    )
    assert (status, body["error"]["code"]) == (403, "PERMISSION_DENIED")
    # No client certificate: refused during the handshake, before any HTTP is spoken.
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await http("GET", f"{base}/healthz", ssl=tls_stack.ssl_context(None))
    # Plaintext HTTP to the TLS port is not served either.
    with pytest.raises((aiohttp.ClientError, ConnectionError)):
        await http("GET", f"http://127.0.0.1:{port}/healthz")


async def test_the_client_library_speaks_mtls(tls_stack: TlsStack) -> None:
    ca, tmp = tls_stack.ca.cert, tls_stack.tmp
    mine = Tls(ca=ca, cert=tmp / "196.crt", key=tmp / "196.key")
    async with Recommender(tls_stack.address, tls=mine, timeout=10) as client:
        answer = await client.recommend("196", count=3, dry_run=True)
    assert len(answer.items) == 3
    assert not answer.degraded
    backend = Tls(
        ca=ca.read_bytes(), cert=(tmp / "web-backend.crt").read_bytes(), key=tmp / "web-backend.key"
    )
    with SyncRecommender(tls_stack.address, tls=backend, timeout=10) as sync_client:
        report = await asyncio.to_thread(sync_client.report_events, [Event("197", "50", "click")])
    assert report.accepted == 1
    # No client certificate: the handshake fails, and UNAVAILABLE is retried until the deadline.
    async with Recommender(tls_stack.address, tls=Tls(ca=ca), timeout=1) as anonymous:
        with pytest.raises(RecommenderError) as refused:
            await anonymous.recommend("196", count=1, dry_run=True)
    assert refused.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
