"""Locust scenario for the gateway's gRPC API (`recsys.v1.Recommender`).

Each simulated user, with a think time between calls, does one of (by weight):
  6  Recommend for a known user (MovieLens-100K ids "1".."943": personalised path)
  2  Recommend for an unknown user (cold-start path)
  2  ReportEvents: impressions of the items its last answer showed, a click on one of them
     now and then, attributed to that answer's request id, scene, position and arm
Every call is reported to locust (name, latency, size, gRPC status as the failure); degraded
answers are successes for locust and are counted apart, printed when the run stops.

Settings, from the environment as in common load-generator images:
  TARGET         host:port of the gateway (default 127.0.0.1:50051; `--host` overrides)
  USERS, RATE, DURATION   users, spawn rate per second and run time (e.g. 30s, 5m), used
                 when the command line does not give --users, --spawn-rate, --run-time
  KNOWN_USERS    highest known user id (default 943); ITEMS highest item id (default 1682)
  COUNT          items per Recommend (default 10); SCENE (default "": the default scene)
  THINK_SECONDS  mean pause between a user's calls (default 0.1; 0 = closed loop)
  CLICK_RATE     chance that an answer gets a click (default 0.2)
  TIMEOUT_SECONDS  deadline of each call (default 1.0)
  LOADTEST_SUMMARY  file to write the final per-call summary to, as JSON (run_loadtest.py
                 reads it: locust's CSV is written every second and misses the last calls)

    locust -f loadtest/locustfile.py --headless          # or: make loadtest
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from grpc.experimental import gevent as grpc_gevent
from locust import User, between, events, task
from locust.env import Environment

from recsys.client import NO_RETRIES, Event, EventKind, Recommendation, RecommenderError, SyncRecommender

# gRPC's C core must hand control back to gevent's hub instead of blocking a real thread, or
# one slow call would stall every simulated user of this process. Before any channel exists.
grpc_gevent.init_gevent()

DEFAULT_TARGET = "127.0.0.1:50051"


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


# USERS / RATE / DURATION → locust's own variables, read after this file is imported; an
# explicit LOCUST_* variable or command-line flag still wins.
for _ours, _locusts in (
    ("USERS", "LOCUST_USERS"),
    ("RATE", "LOCUST_SPAWN_RATE"),
    ("DURATION", "LOCUST_RUN_TIME"),
):
    if os.environ.get(_ours):
        os.environ.setdefault(_locusts, os.environ[_ours])

KNOWN_USERS = _env_int("KNOWN_USERS", 943)
ITEMS = _env_int("ITEMS", 1682)
COUNT = _env_int("COUNT", 10)
SCENE = os.environ.get("SCENE", "")
THINK_SECONDS = _env_float("THINK_SECONDS", 0.1)
CLICK_RATE = _env_float("CLICK_RATE", 0.2)
TIMEOUT_SECONDS = _env_float("TIMEOUT_SECONDS", 1.0)
# Unknown users come from a bounded pool, so a long run does not grow the feature store
# without end (each new user gets exposures and events stored).
UNKNOWN_POOL = 10_000


Result = TypeVar("Result", bound=Any)


class GrpcFailure(Exception):
    """A failed call as locust groups it: by status code (details vary per request)."""


@dataclass
class Answer:
    """What a user was last shown, for attributing its events."""

    user_id: str
    request_id: str
    scene: str
    arm: str
    item_ids: list[str] = field(default_factory=list)


@dataclass
class Tally:
    answers: int = 0
    degraded: int = 0
    cold_start: int = 0
    empty: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


TALLY = Tally()


def target_address(host: str | None) -> str:
    """host:port from --host or TARGET, without a scheme (grpc:// or http:// tolerated)."""
    target = host or os.environ.get("TARGET") or DEFAULT_TARGET
    return target.split("://", 1)[-1].rstrip("/")


class GatewayUser(User):
    """A client of the gateway: recsys.client's blocking client over one channel (gevent makes
    it cooperative), without retries, so that every shed call is seen as a failure."""

    wait_time = between(0.0, 2 * THINK_SECONDS)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.gateway: SyncRecommender | None = None
        self.last: Answer | None = None

    def on_start(self) -> None:
        self.gateway = SyncRecommender(target_address(self.host), timeout=TIMEOUT_SECONDS, retry=NO_RETRIES)

    def on_stop(self) -> None:
        if self.gateway is not None:
            self.gateway.close()

    def _call(self, name: str, call: Callable[[], Result]) -> Result | None:
        """Make the call, report it to locust, return the result (None when it failed)."""
        started = time.perf_counter()
        result: Result | None = None
        failure: Exception | None = None
        try:
            result = call()
        except RecommenderError as error:
            failure = GrpcFailure(error.code.name)
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=result.response.ByteSize() if result is not None else 0,
            exception=failure,
            context={},
        )
        return result

    def _recommend(self, name: str, user_id: str) -> None:
        gateway = self.gateway
        assert gateway is not None
        request_id = f"lt-{uuid.uuid4().hex}"
        response: Recommendation | None = self._call(
            name, lambda: gateway.recommend(user_id, scene=SCENE, count=COUNT, request_id=request_id)
        )
        if response is None:
            return
        TALLY.answers += 1
        TALLY.cold_start += bool(response.cold_start)
        TALLY.empty += not response.items
        if response.degraded_reasons:
            TALLY.degraded += 1
            for reason in response.degraded_reasons:
                TALLY.reasons[reason] = TALLY.reasons.get(reason, 0) + 1
        self.last = Answer(
            user_id=user_id,
            request_id=response.request_id,
            scene=response.scene,
            arm=response.arm,
            item_ids=response.item_ids,
        )

    @task(6)
    def recommend_known_user(self) -> None:
        self._recommend("Recommend known user", str(random.randint(1, KNOWN_USERS)))

    @task(2)
    def recommend_unknown_user(self) -> None:
        self._recommend("Recommend unknown user", f"loadtest-new-{random.randrange(UNKNOWN_POOL)}")

    @task(2)
    def report_events(self) -> None:
        gateway = self.gateway
        assert gateway is not None
        answer = self.last or Answer(
            user_id=str(random.randint(1, KNOWN_USERS)),
            request_id="",
            scene=SCENE,
            arm="",
            item_ids=[str(random.randint(1, ITEMS))],
        )
        self.last = None  # one set of events per answer, as a real client sends
        shown = [
            self._event(answer, item_id, position, "impression")
            for position, item_id in enumerate(answer.item_ids, start=1)
        ]
        if shown and random.random() < CLICK_RATE:
            position = random.randrange(len(answer.item_ids))
            shown.append(self._event(answer, answer.item_ids[position], position + 1, "click"))
        if not shown:
            return
        started = time.perf_counter()
        response = self._call("ReportEvents", lambda: gateway.report_events(shown))
        if response is not None and response.rejected:
            # Every event sent here is valid: a rejection is a bug worth failing the run for.
            reason = response.rejections[0].reason if response.rejections else "?"
            self.environment.events.request.fire(
                request_type="grpc",
                name="ReportEvents rejected",
                response_time=(time.perf_counter() - started) * 1000.0,
                response_length=0,
                exception=GrpcFailure(f"rejected: {reason}"),
                context={},
            )

    @staticmethod
    def _event(answer: Answer, item_id: str, position: int, kind: EventKind) -> Event:
        return Event(
            answer.user_id,
            item_id,
            kind,
            event_id=f"lt-{uuid.uuid4().hex}",
            request_id=answer.request_id,
            scene=answer.scene,
            position=position,
            arm=answer.arm,
        )


class _Run:
    environment: Environment | None = None


def _remember_environment(environment: Environment, **_kwargs: Any) -> None:
    _Run.environment = environment


def _write_summary(**_kwargs: Any) -> None:
    """Final numbers per call name and in aggregate, once every call has been counted."""
    path = os.environ.get("LOADTEST_SUMMARY")
    if not path or _Run.environment is None or _Run.environment.runner is None:
        return
    stats = _Run.environment.runner.stats
    rows = [
        {
            "name": entry.name,
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "rps": entry.total_rps,
            "p50_ms": entry.get_response_time_percentile(0.5),
            "p95_ms": entry.get_response_time_percentile(0.95),
            "p99_ms": entry.get_response_time_percentile(0.99),
        }
        for entry in [*sorted(stats.entries.values(), key=lambda entry: entry.name), stats.total]
    ]
    tally = {"answers": TALLY.answers, "degraded": TALLY.degraded, "reasons": TALLY.reasons}
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"calls": rows, "recommend": tally}, file, indent=2)


def _print_tally(**_kwargs: Any) -> None:
    """Degraded answers are not failures for locust; the operator still wants their share."""
    if not TALLY.answers:
        return
    share = 100.0 * TALLY.degraded / TALLY.answers
    reasons = ", ".join(f"{name} {count}" for name, count in sorted(TALLY.reasons.items())) or "none"
    print(
        f"recommend answers: {TALLY.answers}, degraded {TALLY.degraded} ({share:.2f} %; {reasons}), "
        f"cold start {TALLY.cold_start}, empty {TALLY.empty}",
        flush=True,
    )


# add_listener is unannotated in locust: hence the ignores.
events.init.add_listener(_remember_environment)  # type: ignore[no-untyped-call]
events.test_stop.add_listener(_print_tally)  # type: ignore[no-untyped-call]
events.quit.add_listener(_write_summary)  # type: ignore[no-untyped-call]
