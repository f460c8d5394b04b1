"""Fuzzing the services as an attacker would: hypothesis strategies over every request message
of the protos (any field set or not, strings from empty to far past their limits and full of
control characters, extreme numbers and timestamps, unknown enum values), raw bytes (random
and mutated valid encodings), and HTTP bodies and query strings.

Used by tests/services/test_fuzz.py with a small budget and by loadtest/fuzz.py with a large
one; both send to real servers on loopback and record each answer's code. Calls run from a
worker thread with blocking clients, so the servers keep the test's event loop to themselves.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy

from recsys.v1 import gateway_pb2, rank_pb2, recall_pb2

# The methods fuzzed and their request messages (every unary method of the three services).
GRPC_METHODS: dict[str, type[Message]] = {
    "/recsys.v1.Recommender/Recommend": gateway_pb2.RecommendRequest,
    "/recsys.v1.Recommender/ReportEvents": gateway_pb2.ReportEventsRequest,
    "/recsys.v1.Recall/Recall": recall_pb2.RecallRequest,
    "/recsys.v1.Rank/Rank": rank_pb2.RankRequest,
    "/recsys.v1.Rank/PreRank": rank_pb2.PreRankRequest,
}
GATEWAY_METHODS = ("/recsys.v1.Recommender/Recommend", "/recsys.v1.Recommender/ReportEvents")
# Codes that mean the server failed rather than the request: never acceptable.
FAILURES = frozenset({"INTERNAL", "UNKNOWN"})

# Values a real client sends, so that fuzzing also reaches past validation into the stages.
_KNOWN_TEXT = ["", "196", "253", "50", "1", "default", "diverse_mmr", "home", "control", "zz-unknown"]
_NO_LINE_BREAKS = str.maketrans("", "", "\r\n")
_NASTY_TEXT = ["\r\n", "\x00", "a\r\nX-Injected: 1", "é", "\u202e", "%00", "{}", "../../etc/passwd"]


def _text() -> SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(_KNOWN_TEXT),
        st.sampled_from(_NASTY_TEXT),
        st.text(max_size=40),
        # Far past every limit (ids 128, names 64, default 1,024 characters).
        st.builds(lambda char, n: char * n, st.sampled_from("xé\n\x00"), st.integers(100, 20_000)),
    )


def _number(kind: int) -> SearchStrategy[Any]:
    ints = {
        FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
        FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
        FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
        FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
        FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
        FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    }
    if kind in ints:
        low, high = ints[kind]
        return st.one_of(st.integers(-5, 2000), st.sampled_from([low, high, 0, -1]), st.integers(low, high))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 3.4e38]),
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    raise ValueError(f"field type {kind}: no strategy")


def _scalar(fd: FieldDescriptor) -> SearchStrategy[Any]:
    if fd.type == FieldDescriptor.TYPE_STRING:
        return _text()
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        known = [value.number for value in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    return _number(fd.type)


@st.composite
def _timestamp(draw: DrawFn) -> dict[str, int]:
    seconds = draw(
        st.one_of(
            st.integers(0, 2_000_000_000),
            st.sampled_from([-62_135_596_801, 253_402_300_800, -1, 2**63 - 1, -(2**63)]),
            st.integers(-(2**63), 2**63 - 1),
        )
    )
    nanos = draw(st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1)))
    return {"seconds": seconds, "nanos": nanos}


def message_strategy(descriptor: Any, depth: int = 0) -> SearchStrategy[Message]:
    """Messages of `descriptor` with any subset of fields set to anything their type allows."""
    from google.protobuf import message_factory

    message_class = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: DrawFn) -> Message:
        message = message_class()
        for fd in descriptor.fields:
            if not draw(st.booleans()):
                continue
            _fill(draw, message, fd, depth)
        return message

    return build()


def _fill(draw: DrawFn, message: Message, fd: FieldDescriptor, depth: int) -> None:
    target: Any = message
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(_scalar(key_fd), _scalar(value_fd), max_size=40))
        getattr(target, fd.name).update(entries)
        return
    if fd.message_type is not None:
        if fd.message_type.full_name == "google.protobuf.Timestamp":
            values = [draw(_timestamp())] if not fd.is_repeated else draw(st.lists(_timestamp(), max_size=3))
            for value in values if fd.is_repeated else values[:1]:
                stamp = getattr(target, fd.name).add() if fd.is_repeated else getattr(target, fd.name)
                stamp.seconds, stamp.nanos = value["seconds"], value["nanos"]
            return
        if depth > 2:
            return
        child = message_strategy(fd.message_type, depth + 1)
        if fd.is_repeated:
            for item in draw(st.lists(child, max_size=4)):
                getattr(target, fd.name).add().CopyFrom(item)
        else:
            getattr(target, fd.name).CopyFrom(draw(child))
        return
    if fd.is_repeated:
        size = draw(st.one_of(st.integers(0, 5), st.sampled_from([200, 2000])))
        getattr(target, fd.name).extend(draw(st.lists(_scalar(fd), min_size=size, max_size=size)))
        return
    setattr(target, fd.name, draw(_scalar(fd)))


@st.composite
def grpc_case(draw: DrawFn, methods: tuple[str, ...] = tuple(GRPC_METHODS)) -> tuple[str, bytes]:
    """(method, request bytes): an encoded fuzzed message, a mutated one, or random bytes."""
    method = draw(st.sampled_from(methods))
    kind = draw(st.sampled_from(["message", "message", "mutated", "random"]))
    if kind == "random":
        return method, draw(st.binary(max_size=512))
    data = draw(message_strategy(GRPC_METHODS[method].DESCRIPTOR)).SerializeToString()
    if kind == "mutated" and data:
        edits = draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=4)
        )
        buffer = bytearray(data)
        for position, value in edits:
            buffer[position] = value
        data = bytes(buffer) + draw(st.binary(max_size=8))
    return method, data


def _json_value(max_leaves: int = 20) -> SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _text())
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text(), inner, max_size=4),
        max_leaves=max_leaves,
    )


@dataclass(frozen=True)
class HttpCase:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@st.composite
def http_case(draw: DrawFn) -> HttpCase:
    """A request to the gateway's HTTP port: fuzzed messages as JSON, JSON of any shape, deep
    nesting, garbage bodies, query strings, request-id headers."""
    path = draw(st.sampled_from(["/v1/recommend", "/v1/events"]))
    headers = {"Content-Type": "application/json"}
    if draw(st.booleans()):
        # Header values http.client can send (latin-1, no CR or LF; the raw-socket regression
        # test sends those).
        headers["X-Request-Id"] = draw(
            st.one_of(
                st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300), _text()
            ).map(lambda text: text.encode("latin-1", "ignore").decode("latin-1").translate(_NO_LINE_BREAKS))
        )
    kind = draw(st.sampled_from(["message", "message", "json", "deep", "garbage", "query"]))
    if kind == "query":
        params = draw(
            st.dictionaries(
                st.sampled_from(["user_id", "scene", "count", "debug", "dry_run", "other"]),
                _text(),
                max_size=5,
            )
        )
        return HttpCase("GET", "/v1/recommend?" + urllib.parse.urlencode(params), headers=headers)
    if kind == "message":
        message_class = (
            gateway_pb2.RecommendRequest if path == "/v1/recommend" else gateway_pb2.ReportEventsRequest
        )
        message = draw(message_strategy(message_class.DESCRIPTOR))
        try:
            document: Any = json_format.MessageToDict(message, preserving_proto_field_name=True)
        except (ValueError, json_format.Error):
            document = {"user_id": "196"}  # a Timestamp JSON cannot express: sent as a plain request
        body = json.dumps(document).encode()
    elif kind == "json":
        body = json.dumps(draw(_json_value())).encode()
    elif kind == "deep":
        depth = draw(st.integers(10, 100_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        body = ('{"user_id": ' + opener * depth + "1" + closer * depth + "}").encode()
    else:
        body = draw(st.binary(max_size=512))
    return HttpCase("POST", path, body, headers)


@dataclass
class Tally:
    """Codes seen, by transport: what the fuzz reports and asserts on."""

    grpc: Counter[str] = field(default_factory=Counter)
    http: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first few bad cases, for the report

    def bad(self, description: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(description[:300])


def grpc_caller(
    addresses: dict[str, str], tally: Tally, timeout: float = 10.0
) -> Callable[[str, bytes], str]:
    """A blocking call of any method (`addresses`: method → host:port) with raw request bytes;
    returns and tallies the code."""
    channels = {address: grpc.insecure_channel(address) for address in set(addresses.values())}
    stubs: dict[str, Any] = {
        method: channels[address].unary_unary(method) for method, address in addresses.items()
    }

    def call(method: str, data: bytes) -> str:
        try:
            stubs[method](data, timeout=timeout)
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
            if code in FAILURES:
                tally.bad(f"{method} {data[:100]!r}: {code} {error.details()}")
        tally.grpc[code] += 1
        return code

    return call


def http_caller(port: int, tally: Tally, timeout: float = 10.0) -> Callable[[HttpCase], str]:
    """A blocking HTTP request; returns and tallies the status ("dropped" when the server
    closed the connection without an answer)."""

    def call(case: HttpCase) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            # The server may answer before the body is in (413 for an oversized one) and close:
            # the answer is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.request(case.method, case.path, body=case.body or None, headers=case.headers)
            response = connection.getresponse()
            response.read()
            status = str(response.status)
        except (http.client.HTTPException, ConnectionError) as error:
            status = "dropped"
            tally.bad(f"{case.method} {case.path} {case.body[:100]!r}: {type(error).__name__}")
        finally:
            connection.close()
        if status == "500":
            tally.bad(f"{case.method} {case.path} {case.body[:100]!r}: 500")
        tally.http[status] += 1
        return status

    return call


def rss_bytes() -> int:
    """This process's resident set size (Linux), for the fuzz script's growth figure."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
