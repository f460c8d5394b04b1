"""How big anything a caller sends may be: one table for every service and both edges (gRPC
and HTTP/JSON decode into the same messages), documented in the protos' comments.

Everything a client chooses costs memory, Redis bytes, log volume or metric series, so every
string and list field is bounded: the limits below, or the defaults for a field not listed
(a field added later is bounded the day it is added). A value past its limit is
INVALID_ARGUMENT naming the field (`exclude_item_ids[3]: at most 128 characters, got 10240`).
Timestamps must lie in google.protobuf.Timestamp's own range (years 1 to 9999), which the
protobuf runtime checks only when converting, far from the edge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from recsys.errors import InvalidArgument

ID_CHARS = 128  # user, item, event and request ids
NAME_CHARS = 64  # scene, arm, region, channel and task names
VERSION_CHARS = 128  # model version names (the store allows no longer ones)
ATTRIBUTE_BYTES = 256  # a context attribute's key or value, UTF-8
DEFAULT_TEXT_CHARS = 1024  # any string field not listed below
DEFAULT_LIST_ITEMS = 10_000  # any repeated or map field not listed below
EMBEDDING_VALUES = 1024  # a user embedding (the models use 32 to 128)
PROVENANCE_CELLS = 10_000 * 64  # candidates × channels of a provenance matrix
TITLE_CHARS = 512  # a catalogue item's title
CREDIT_CHARS = 256  # a catalogue item's author or publisher

TEXT_CHARS: dict[str, int] = {
    "recsys.v1.RequestContext.region": NAME_CHARS,
    "recsys.v1.RecommendRequest.user_id": ID_CHARS,
    "recsys.v1.RecommendRequest.scene": NAME_CHARS,
    "recsys.v1.RecommendRequest.exclude_item_ids": ID_CHARS,
    "recsys.v1.RecommendRequest.request_id": ID_CHARS,
    "recsys.v1.Event.event_id": ID_CHARS,
    "recsys.v1.Event.user_id": ID_CHARS,
    "recsys.v1.Event.item_id": ID_CHARS,
    "recsys.v1.Event.request_id": ID_CHARS,
    "recsys.v1.Event.scene": NAME_CHARS,
    "recsys.v1.Event.arm": NAME_CHARS,
    "recsys.v1.RecallRequest.user_id": ID_CHARS,
    "recsys.v1.RecallRequest.model_version": VERSION_CHARS,
    "recsys.v1.RecallRequest.QuotasEntry.key": NAME_CHARS,
    "recsys.v1.RankRequest.user_id": ID_CHARS,
    "recsys.v1.RankRequest.model_version": VERSION_CHARS,
    "recsys.v1.RankRequest.scene": NAME_CHARS,
    "recsys.v1.Fusion.WeightsEntry.key": NAME_CHARS,
    "recsys.v1.Fusion.ExponentsEntry.key": NAME_CHARS,
    "recsys.v1.PreRankRequest.model_version": VERSION_CHARS,
    "recsys.v1.Provenance.channels": NAME_CHARS,
    "recsys.v1.CatalogueItem.item_id": ID_CHARS,
    "recsys.v1.CatalogueItem.title": TITLE_CHARS,
    "recsys.v1.CatalogueItem.author": CREDIT_CHARS,
    "recsys.v1.CatalogueItem.publisher": CREDIT_CHARS,
    "recsys.v1.CatalogueItem.categories": NAME_CHARS,
    "recsys.v1.WithdrawItemsRequest.item_ids": ID_CHARS,
}
TEXT_BYTES: dict[str, int] = {
    "recsys.v1.RequestContext.AttributesEntry.key": ATTRIBUTE_BYTES,
    "recsys.v1.RequestContext.AttributesEntry.value": ATTRIBUTE_BYTES,
    # Provenance matrices: [candidates × channels] of int16 / float32; their sizes must also
    # match the candidates (checked where they are decoded).
    "recsys.v1.Provenance.ranks": 2 * PROVENANCE_CELLS,
    "recsys.v1.Provenance.scores": 4 * PROVENANCE_CELLS,
}
LIST_ITEMS: dict[str, int] = {
    "recsys.v1.RequestContext.attributes": 32,
    # The configured maxima (gateway max_exclusions and max_events, rank max_candidates)
    # are checked by the engines with their own messages; these are the hard ceilings.
    "recsys.v1.RecommendRequest.exclude_item_ids": 10_000,
    "recsys.v1.ReportEventsRequest.events": 10_000,
    "recsys.v1.RecallRequest.quotas": 16,
    "recsys.v1.RecallRequest.exclude_item_indexes": 100_000,
    "recsys.v1.RankRequest.item_indexes": 100_000,
    "recsys.v1.RankRequest.user_embedding": EMBEDDING_VALUES,
    "recsys.v1.Provenance.channels": 64,
    "recsys.v1.Provenance.merge_scores": 100_000,
    "recsys.v1.Fusion.weights": 16,
    "recsys.v1.Fusion.exponents": 16,
    "recsys.v1.PreRankRequest.item_indexes": 100_000,
    "recsys.v1.PreRankRequest.user_embedding": EMBEDDING_VALUES,
    "recsys.v1.UserHistory.item_indexes": 1000,
    "recsys.v1.UserHistory.liked": 1000,
    # The gateway's `max_catalogue_items` (1,000) is checked by its engine; these are ceilings.
    "recsys.v1.UpsertItemsRequest.items": 10_000,
    "recsys.v1.WithdrawItemsRequest.item_ids": 10_000,
    "recsys.v1.CatalogueItem.categories": 16,
}

# google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
_TIMESTAMP = "google.protobuf.Timestamp"
_SIZED_TYPES = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)


def text_limit(full_name: str) -> int:
    return TEXT_CHARS.get(full_name, DEFAULT_TEXT_CHARS)


def valid_request_id(value: str) -> bool:
    """A request id that may travel in headers, metadata and logs: 1 to 128 printable ASCII
    characters (no CR, LF, NUL or other control bytes a header would choke on)."""
    return 0 < len(value) <= ID_CHARS and value.isascii() and value.isprintable()


def first_problem(message: Message, skip: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """(field path, problem) of the first field past its limit, or None. Fields whose full
    name is in `skip` are not descended into (ReportEvents judges each event on its own)."""
    return _walk(message, "", skip)


def check_request(message: Message, skip: frozenset[str] = frozenset()) -> None:
    """Raise InvalidArgument naming the first field past its limit."""
    problem = first_problem(message, skip)
    if problem is not None:
        raise InvalidArgument(*problem)


def _walk(message: Message, prefix: str, skip: frozenset[str]) -> tuple[str, str] | None:
    if message.DESCRIPTOR.full_name == _TIMESTAMP:
        return _timestamp_problem(message, prefix.rstrip("."))
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.is_repeated:
            most = LIST_ITEMS.get(field.full_name, DEFAULT_LIST_ITEMS)
            if len(value) > most:
                return path, f"at most {most} entries, got {len(value)}"
            if field.full_name in skip:
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                problem = _map_problem(field, value, path, skip)
            else:
                problem = _items_problem(field, value, path, skip)
        else:
            problem = _value_problem(field, value, path, skip)
        if problem is not None:
            return problem
    return None


def _items_problem(
    field: FieldDescriptor, values: Iterable[object], path: str, skip: frozenset[str]
) -> tuple[str, str] | None:
    if field.type not in _SIZED_TYPES:
        return None  # numbers: their count is the only size
    for index, value in enumerate(values):
        problem = _value_problem(field, value, f"{path}[{index}]", skip)
        if problem is not None:
            return problem
    return None


def _map_problem(
    field: FieldDescriptor, entries: Mapping[object, object], path: str, skip: frozenset[str]
) -> tuple[str, str] | None:
    entry = field.message_type
    assert entry is not None  # a map field's entries are messages
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for key, value in entries.items():
        problem = _value_problem(key_field, key, f"{path} key", skip) or _value_problem(
            value_field, value, f"{path}[{str(key)[:NAME_CHARS]!r}]", skip
        )
        if problem is not None:
            return problem
    return None


def _value_problem(
    field: FieldDescriptor, value: object, path: str, skip: frozenset[str]
) -> tuple[str, str] | None:
    if isinstance(value, str):
        most_bytes = TEXT_BYTES.get(field.full_name)
        if most_bytes is not None:
            size = len(value.encode("utf-8", errors="surrogatepass"))
            return (path, f"at most {most_bytes} bytes, got {size}") if size > most_bytes else None
        most = text_limit(field.full_name)
        return (path, f"at most {most} characters, got {len(value)}") if len(value) > most else None
    if isinstance(value, bytes):
        most = TEXT_BYTES.get(field.full_name, DEFAULT_TEXT_CHARS)
        return (path, f"at most {most} bytes, got {len(value)}") if len(value) > most else None
    if isinstance(value, Message) and field.full_name not in skip:
        return _walk(value, f"{path}.", skip)
    return None


def _timestamp_problem(timestamp: Message, path: str) -> tuple[str, str] | None:
    seconds = int(getattr(timestamp, "seconds", 0))
    nanos = int(getattr(timestamp, "nanos", 0))
    if not TIMESTAMP_MIN_SECONDS <= seconds <= TIMESTAMP_MAX_SECONDS:
        return path, f"seconds must be in [{TIMESTAMP_MIN_SECONDS}, {TIMESTAMP_MAX_SECONDS}], got {seconds}"
    if not 0 <= nanos <= 999_999_999:
        return path, f"nanos must be in [0, 999999999], got {nanos}"
    return None
