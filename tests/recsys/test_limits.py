"""Field limits: one table for every service and both edges."""

from __future__ import annotations

import re

import pytest

from recsys.errors import InvalidArgument
from recsys.limits import (
    DEFAULT_LIST_ITEMS,
    DEFAULT_TEXT_CHARS,
    check_request,
    first_problem,
    valid_request_id,
)
from recsys.v1 import gateway_pb2, rank_pb2, recall_pb2


def test_a_message_within_its_limits_passes() -> None:
    request = gateway_pb2.RecommendRequest(user_id="196", scene="home", exclude_item_ids=["50"] * 1000)
    request.context.attributes["device"] = "phone"
    request.context.request_time.seconds = 1_700_000_000
    check_request(request)


@pytest.mark.parametrize(
    ("message", "field", "problem"),
    [
        (gateway_pb2.RecommendRequest(user_id="u" * 129), "user_id", "at most 128 characters, got 129"),
        (rank_pb2.RankRequest(scene="s" * 65), "scene", "at most 64 characters"),
        (recall_pb2.RecallRequest(quotas={"q" * 65: 1}), "quotas key", "at most 64 characters"),
        (rank_pb2.RankRequest(user_embedding=[0.0] * 1025), "user_embedding", "at most 1024 entries"),
        (
            rank_pb2.RankRequest(fusion=rank_pb2.Fusion(weights={f"t{n}": 1.0 for n in range(17)})),
            "fusion.weights",
            "at most 16 entries",
        ),
        (
            gateway_pb2.ReportEventsRequest(events=[gateway_pb2.Event(scene="s" * 65)]),
            "events[0].scene",
            "at most 64 characters",
        ),
    ],
)
def test_the_first_field_past_its_limit_is_named(message: object, field: str, problem: str) -> None:
    found = first_problem(message)  # type: ignore[arg-type]
    assert found is not None
    assert found[0] == field
    assert problem in found[1]
    with pytest.raises(InvalidArgument, match=f"^{re.escape(field)}: "):
        check_request(message)  # type: ignore[arg-type]


def test_unlisted_fields_get_the_defaults() -> None:
    long_detail = recall_pb2.ChannelStats(detail="d" * (DEFAULT_TEXT_CHARS + 1))
    assert first_problem(long_detail) == ("detail", f"at most {DEFAULT_TEXT_CHARS} characters, got 1025")
    many = recall_pb2.RecallResponse(channel_names=["x"] * (DEFAULT_LIST_ITEMS + 1))
    found = first_problem(many)
    assert found is not None
    assert found[0] == "channel_names"


def test_attributes_are_bounded_in_utf8_bytes() -> None:
    request = gateway_pb2.RecommendRequest(user_id="196")
    request.context.attributes["k"] = "é" * 129  # 258 bytes, 129 characters
    assert first_problem(request) == ("context.attributes['k']", "at most 256 bytes, got 258")


@pytest.mark.parametrize(("seconds", "nanos"), [(253_402_300_800, 0), (-62_135_596_801, 0), (0, -1)])
def test_timestamps_outside_their_range_are_refused(seconds: int, nanos: int) -> None:
    event = gateway_pb2.Event(user_id="196")
    event.time.seconds, event.time.nanos = seconds, nanos
    found = first_problem(event)
    assert found is not None
    assert found[0] == "time"


def test_skipped_fields_are_counted_but_not_descended_into() -> None:
    request = gateway_pb2.ReportEventsRequest(events=[gateway_pb2.Event(user_id="u" * 200)])
    assert first_problem(request, skip=frozenset({"recsys.v1.ReportEventsRequest.events"})) is None


@pytest.mark.parametrize(
    ("value", "valid"),
    [("abc-123", True), ("", False), ("r" * 128, True), ("r" * 129, False), ("a\r\nb", False), ("é", False)],
)
def test_request_ids_must_be_short_printable_ascii(value: str, valid: bool) -> None:
    assert valid_request_id(value) is valid
