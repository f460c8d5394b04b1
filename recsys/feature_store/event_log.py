"""The durable log of feedback events: every accepted event, appended in arrival order, for a
later `recsys build` to learn from (the live history in the feature store is capped and
expires; this log is not).

Two implementations behind one Protocol, like the feature store:
- `RedisEventLog`: a Redis stream (`XADD`, approximately capped at `max_length` entries and at
  `max_bytes` of entries), one field per column; `recsys events export` writes it out as the
  CSV below.
- `FileEventLog`: a CSV file with a header, appended to (the embedded mode); past `max_bytes`
  it is renamed to `<name>.1` (replacing the previous one) and a new file is started.

Both are capped in bytes as well as entries: entries alone let a client with long fields
multiply the log's size (every field is bounded by recsys.limits, but the cap is what holds). Its columns are
  what `recsys build --dataset csv` reads: `--interactions events.csv --user-col user_id
  --item-col item_id --rating-col value --time-col time`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from recsys.feature_store.base import EVENT_KINDS, FeatureStoreUnavailable
from recsys.feature_store.redis_store import RedisFeatureStore

DEFAULT_MAX_BYTES = 2 * 1024**3  # 2 GiB: months of events at hundreds a second

COLUMNS = (
    "time",
    "user_id",
    "item_id",
    "type",
    "value",
    "event_id",
    "request_id",
    "scene",
    "position",
    "arm",
)


@dataclass(frozen=True)
class LoggedEvent:
    """One accepted event as the log keeps it."""

    time: float
    user_id: str
    item_id: str
    type: str  # one of EVENT_KINDS
    value: float
    event_id: str
    request_id: str = ""
    scene: str = ""
    position: int = 0
    arm: str = ""

    def __post_init__(self) -> None:
        if self.type not in EVENT_KINDS:
            raise ValueError(f"type: expected one of {', '.join(EVENT_KINDS)}, got {self.type!r}")

    def row(self) -> list[str]:
        return [
            repr(float(self.time)),
            self.user_id,
            self.item_id,
            self.type,
            repr(float(self.value)),
            self.event_id,
            self.request_id,
            self.scene,
            str(self.position),
            self.arm,
        ]

    @classmethod
    def from_row(cls, row: Sequence[str]) -> LoggedEvent:
        values = dict(zip(COLUMNS, row, strict=True))
        return cls(
            time=float(values["time"]),
            user_id=values["user_id"],
            item_id=values["item_id"],
            type=values["type"],
            value=float(values["value"]),
            event_id=values["event_id"],
            request_id=values["request_id"],
            scene=values["scene"],
            position=int(values["position"]),
            arm=values["arm"],
        )


class EventLog(Protocol):
    async def append(self, events: Sequence[LoggedEvent], *, deadline: float | None = None) -> None:
        """Append in order; raises FeatureStoreUnavailable when the log cannot be written.
        `deadline` (a `time.monotonic()` instant): until when a failed write may be retried
        (never appending twice), as the feature store's event writes."""
        ...

    async def read(self, limit: int | None = None) -> list[LoggedEvent]:
        """The oldest `limit` events (all when None), oldest first."""
        ...

    async def close(self) -> None: ...


def csv_lines(events: Sequence[LoggedEvent], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(COLUMNS)
    writer.writerows(event.row() for event in events)
    return buffer.getvalue()


class FileEventLog:
    """Appends CSV rows to one file. Writes happen in a worker thread (a disk write must not
    stall the event loop) under a lock, so concurrent appends never interleave."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes: expected at least 1, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    @property
    def rotated_path(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def _write(self, events: Sequence[LoggedEvent]) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            size = self.path.stat().st_size if self.path.exists() else 0
            if size >= self.max_bytes:
                # One generation kept: the disk holds at most about twice max_bytes.
                os.replace(self.path, self.rotated_path)
                size = 0
            with self.path.open("a", encoding="utf-8", newline="") as file:
                file.write(csv_lines(events, size == 0))
                file.flush()

    async def append(self, events: Sequence[LoggedEvent], *, deadline: float | None = None) -> None:
        if not events:
            return
        try:
            await asyncio.to_thread(self._write, list(events))
        except OSError as error:
            raise FeatureStoreUnavailable(f"cannot append to {self.path}: {error}", "event log") from error

    def _read(self, limit: int | None) -> list[LoggedEvent]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8", newline="") as file:
            rows = csv.reader(file)
            next(rows, None)  # header
            events: list[LoggedEvent] = []
            for row in rows:
                if limit is not None and len(events) >= limit:
                    break
                events.append(LoggedEvent.from_row(row))
        return events

    async def read(self, limit: int | None = None) -> list[LoggedEvent]:
        return await asyncio.to_thread(self._read, limit)

    async def close(self) -> None:
        return None


class RedisEventLog:
    """The event log as a Redis stream next to the feature store's keys (`P:events`)."""

    def __init__(
        self, store: RedisFeatureStore, max_length: int = 10_000_000, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length: expected at least 1, got {max_length}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes: expected at least 1, got {max_bytes}")
        self._store = store
        self.max_length = max_length
        self.max_bytes = max_bytes
        self._entry_bytes = 0.0  # running mean of an entry's size, as Redis roughly stores it

    def cap(self) -> int:
        """Entries to keep: `max_length`, or fewer when entries are large. A stream cannot be
        trimmed by bytes, so the byte cap becomes an entry cap through the mean entry size."""
        if self._entry_bytes <= 0:
            return self.max_length
        return max(1, min(self.max_length, int(self.max_bytes / self._entry_bytes)))

    async def append(self, events: Sequence[LoggedEvent], *, deadline: float | None = None) -> None:
        rows = [dict(zip(COLUMNS, event.row(), strict=True)) for event in events]
        for row in rows:
            # Field names and values plus Redis's per-entry overhead (about 16 bytes a field).
            size = sum(len(name) + len(value.encode("utf-8")) + 16 for name, value in row.items())
            self._entry_bytes = size if self._entry_bytes == 0 else 0.99 * self._entry_bytes + 0.01 * size
        await self._store.log_append(rows, self.cap(), deadline=deadline)

    async def read(self, limit: int | None = None) -> list[LoggedEvent]:
        entries = await self._store.log_read(limit)
        return [LoggedEvent.from_row([entry[column] for column in COLUMNS]) for entry in entries]

    async def close(self) -> None:
        return None  # the store owns the connection


def event_log_for(features: object, path: Path | None, max_bytes: int = DEFAULT_MAX_BYTES) -> EventLog:
    """The log beside a feature store: its Redis stream for a Redis store, else a CSV file
    (`path`, required then)."""
    if isinstance(features, RedisFeatureStore):
        return RedisEventLog(features, max_bytes=max_bytes)
    if path is None:
        raise ValueError("event log: a file path is needed without Redis")
    return FileEventLog(path, max_bytes=max_bytes)
